"""Checkpoints as atomic directories (`kubelm_runtime.atomic`): a directory named step-NNNNNNNN is
complete by construction; a crash leaves at most a dot-named leftover, which listings ignore and the
next save removes. Only the newest `keep` survive.
"""

from __future__ import annotations

import json
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


def save(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, scaler: Any, rng_states: list[dict[str, Any]], state: dict[str, Any], keep: int) -> Path:
    final = directory / f"step-{step:08d}"
    with atomic_directory(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_states}, tmp / "training.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
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
    return json.loads((path / STATE_FILE).read_text()), saved["rng"]
