"""Data-parallel set-up from torchrun's or a Kubernetes indexed Job's environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes checkpoints, artifacts and progress."""
        return self.rank == 0


def world_from_env(environ: dict[str, str] | None = None) -> World:
    """RANK/WORLD_SIZE/LOCAL_RANK (torchrun), with JOB_COMPLETION_INDEX standing in for RANK
    in an indexed Job where each pod runs one worker."""
    e = os.environ if environ is None else environ
    size = int(e.get("WORLD_SIZE", "1"))
    rank = int(e.get("RANK", e.get("JOB_COMPLETION_INDEX", "0")))
    local_rank = int(e.get("LOCAL_RANK", "0"))
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} outside WORLD_SIZE {size}")
    return World(rank, size, local_rank)


def init(world: World, device: torch.device) -> None:
    if world.enabled and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=world.rank, world_size=world.size, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def all_sum(world: World, values: list[float], device: torch.device) -> list[float]:
    if not world.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(world: World, obj: Any) -> list[Any]:
    if not world.enabled:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj: Any) -> Any:
    if not world.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
