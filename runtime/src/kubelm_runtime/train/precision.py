"""Choosing the numeric precision: `auto` picks bf16 where the hardware is fast at it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..cpu import cpu_has_fast_bf16


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None
    """Compute dtype under autocast; weights and optimizer state stay fp32."""
    loss_scaling: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve(requested: str, device: torch.device, cpuinfo: str | None = None) -> Precision:
    """The precision to train in; `auto` picks bf16 where the device runs it fast (`cpuinfo`: this
    machine's /proc/cpuinfo unless given)."""
    if device.type == "cuda":
        # TF32 matmuls: fp32 range with tensor-core speed for whatever autocast leaves in fp32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        bf16_ok = cpu_has_fast_bf16(cpuinfo)
    if requested == "auto":
        requested = "bf16" if bf16_ok else "fp32"
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if requested == "fp16":
        return Precision("fp16", torch.float16, True)
    return Precision("fp32", None, False)
