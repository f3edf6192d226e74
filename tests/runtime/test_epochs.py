"""Each epoch trains on its own seeded order, and a run stopped anywhere resumes into the same run.

In-process runs on a small slice of the corpus (a handful of steps per epoch); a stop is an
exception raised right after a step was logged and before anything else is written, which
leaves on disk what a SIGKILL at that point would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubelm_contract.settings import load
from kubelm_runtime import artifacts
from kubelm_runtime.train import loop
from kubelm_runtime.train.data import Blocks, epoch_order
from kubelm_runtime.train.settings import TrainConfig

from .conftest import Killed

pytestmark = pytest.mark.slow
BATCH, MAX_LENGTH = 4, 32


def _config(out: Path, tiny_model: Path, train: Path, corpus: dict[str, Path], **hyperparameters: Any) -> TrainConfig:
    return load(TrainConfig, {
        "jobId": "tests/epochs", "outputDir": str(out), "baseModel": {"uri": str(tiny_model)},
        "dataset": {"train": str(train), "validation": str(corpus["valid"])},
        "hyperparameters": {"batchSize": BATCH, "maxLength": MAX_LENGTH, "learningRate": 0.003, "warmupSteps": 2,
                            "evalIntervalSteps": 0, "seed": 7, "precision": "fp32", **hyperparameters},
        "checkpointing": {"intervalSteps": 3, "keep": 2},
        "publish": {"artifactCache": False}, "device": "cpu", "logIntervalSteps": 1, "progressIntervalSeconds": 0,
    })


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _run(config: TrainConfig, monkeypatch: pytest.MonkeyPatch, kill_at: set[int] | None = None) -> dict[str, Any]:
    """Runs training; with kill_at, stops right after the first of those steps is logged."""
    original = loop.Training._log_metrics
    pending = set(kill_at or ())

    def log_then_maybe_die(self: loop.Training, record: dict[str, Any]) -> None:
        original(self, record)
        if "loss" in record and record["step"] in pending:
            pending.discard(record["step"])
            raise Killed(record["step"])

    with monkeypatch.context() as patch:
        patch.setattr(loop.Training, "_log_metrics", log_then_maybe_die)
        return loop.run(config, None)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_epoch_consumes_its_own_order_once(accumulation: int, tmp_path: Path, tiny_model: Path,
                                                small_corpus: Path, corpus: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = 3
    calls: list[tuple[Blocks, np.ndarray]] = []
    original = Blocks.batch

    def recording(self: Blocks, indices: np.ndarray) -> np.ndarray:
        calls.append((self, np.array(indices)))
        return original(self, indices)

    config = _config(tmp_path, tiny_model, small_corpus, corpus, epochs=epochs,
                     gradientAccumulationSteps=accumulation)
    monkeypatch.setattr(Blocks, "batch", recording)
    result = loop.run(config, None)
    train = calls[0][0]  # the first batch is a training one; evaluation batches come from another Blocks
    used = [indices for blocks, indices in calls if blocks is train]
    steps = int(result["steps"])
    assert len(used) == steps * accumulation and steps % epochs == 0
    per_epoch = len(used) // epochs
    orders = [epoch_order(train.count, 7, epoch, 0, 1, BATCH) for epoch in range(epochs)]
    for epoch, order in enumerate(orders):
        consumed = np.concatenate(used[epoch * per_epoch:(epoch + 1) * per_epoch])
        assert np.array_equal(consumed, order[:len(consumed)]), epoch
        assert len(set(consumed.tolist())) == len(consumed), "a block used twice in one epoch"
    assert not np.array_equal(orders[0], orders[1])

EPOCHS = 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, small_corpus: Path,
                  corpus: dict[str, Path]) -> tuple[dict[str, Any], dict[int, float], str]:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = loop.run(_config(out, tiny_model, small_corpus, corpus, epochs=EPOCHS), None)
    return result, _losses(out), artifacts.read_manifest(out / "model")["digest"]


# Where runs are stopped, in steps per epoch: fractions pick a step inside an epoch.
STOPS = {
    "inside the first epoch": [0.5],
    "on the last step of an epoch": [1.0],
    "right after an epoch boundary": [1.0 + 1e-9],
    "inside a later epoch": [2.4],
    "twice in one run": [0.8, 2.1],
}


@pytest.mark.parametrize("where", list(STOPS))
def test_a_run_stopped_anywhere_resumes_into_the_same_run(
        where: str, tmp_path: Path, tiny_model: Path, small_corpus: Path, corpus: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch, uninterrupted: tuple[dict[str, Any], dict[int, float], str]) -> None:
    expected_result, expected_losses, expected_digest = uninterrupted
    per_epoch = int(expected_result["steps"]) // EPOCHS
    config = _config(tmp_path, tiny_model, small_corpus, corpus, epochs=EPOCHS)
    for fraction in STOPS[where]:
        step = min(int(np.ceil(fraction * per_epoch)), int(expected_result["steps"]) - 1)
        with pytest.raises(Killed):
            _run(config, monkeypatch, kill_at={step})
        assert max(_losses(tmp_path)) == step
    result = _run(config, monkeypatch)
    assert _losses(tmp_path) == expected_losses  # every step's loss, to the last bit
    assert result["metrics"] == expected_result["metrics"]
    assert result["attempt"] == len(STOPS[where]) + 1
    assert artifacts.read_manifest(tmp_path / "model")["digest"] == expected_digest
