"""Checkpoints as atomic directories (`kubelm_runtime.atomic`): a directory named step-NNNNNNNN is
complete by construction; a crash leaves at most a dot-named leftover, which listings ignore and the
next save removes. Only the newest `keep` survive.

Each checkpoint is stamped with the incarnation (the TrainingJob's uid) that wrote it, so a job
deleted and created again under the same name never resumes its predecessor's run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..atomic import atomic_directory, remove_leftovers

NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
STAMP = "incarnation"
"""The key in STATE_FILE naming the incarnation that wrote the checkpoint; absent when it had none."""
FOREIGN_DIR = "foreign-checkpoints"
"""Beside the checkpoint directory: where checkpoints of other incarnations are moved, one folder each."""

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and NAME.match(p.name))


def latest(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def stamp(path: Path) -> str | None:
    """The incarnation that wrote the checkpoint at `path`; None when it had none or predates stamps."""
    found = json.loads((path / STATE_FILE).read_text()).get(STAMP)
    return None if found is None else str(found)


def _describe(incarnation: str | None) -> str:
    return f"incarnation {incarnation!r}" if incarnation is not None else "no incarnation"


def set_aside_foreign(directory: Path, incarnation: str | None) -> list[Path]:
    """Moves every checkpoint in `directory` not stamped with `incarnation` out of it; returns where to.

    Moved out rather than skipped in place: pruning keeps the newest `keep` by step, so a foreign run
    that got further would outlive this run's own checkpoints, and a same-numbered step would replace
    it. Moved rather than deleted: it may be the only copy of that other run.

    An unstamped checkpoint counts as this run's only when this run has no incarnation either: nothing
    shows that an older runtime wrote it for this run, and resuming the wrong run publishes the wrong
    model under this job's name, while refusing it costs only the time to train again.
    """
    moved: list[Path] = []
    for path in list_checkpoints(directory):
        found = stamp(path)
        if found == incarnation:
            continue
        folder = "unstamped" if found is None else re.sub(r"[^A-Za-z0-9_-]", "_", found)
        target = directory.parent / FOREIGN_DIR / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # Only two runs writing into one directory at once get here: the newer copy of that step wins.
            shutil.rmtree(target)
        os.replace(path, target)
        found_as = f"belongs to {_describe(found)}" if found is not None else "has no incarnation stamp"
        log.warning("checkpoint %s %s, this run has %s: not resuming from it, moved to %s",
                    path.name, found_as, _describe(incarnation), target)
        moved.append(target)
    return moved


def save(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, scaler: Any, rng_states: list[dict[str, Any]], state: dict[str, Any], keep: int, *,
         incarnation: str | None) -> Path:
    final = directory / f"step-{step:08d}"
    stamped = {k: v for k, v in state.items() if k != STAMP}
    if incarnation is not None:
        stamped[STAMP] = incarnation
    with atomic_directory(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_states}, tmp / "training.pt")
        (tmp / STATE_FILE).write_text(json.dumps(stamped, indent=2))
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(directory, "step-*")
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         scaler: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restores model, optimizer, scheduler and scaler; returns (trainer state, per-rank RNG states)."""
    load_model(model, str(path / "model.safetensors"))
    saved = torch.load(path / "training.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    state = json.loads((path / STATE_FILE).read_text())
    state.pop(STAMP, None)  # the checkpoint's provenance, not the trainer's; each save stamps anew
    return state, saved["rng"]
