"""A TrainingJob deleted and created again under the same name, on the same output directory: the new
incarnation trains a run of its own and never resumes, prunes over or publishes the old one's.

In-process runs like test_epochs.py: a stop is an exception raised right after a step was logged,
which leaves on disk what a SIGKILL at that point would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kubelm_contract.settings import load
from kubelm_runtime import artifacts
from kubelm_runtime.train import checkpoint, loop
from kubelm_runtime.train.settings import TrainConfig

from .conftest import Killed

pytestmark = pytest.mark.slow
STEPS = 8


def _config(out: Path, tiny_model: Path, train: Path, corpus: dict[str, Path], incarnation: str | None,
            **hyperparameters: Any) -> TrainConfig:
    document: dict[str, Any] = {
        "jobId": "tests/same-name", "outputDir": str(out), "baseModel": {"uri": str(tiny_model)},
        "dataset": {"train": str(train), "validation": str(corpus["valid"])},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 4, "maxLength": 32, "learningRate": 0.003,
                            "warmupSteps": 2, "evalIntervalSteps": 0, "seed": 7, "precision": "fp32",
                            **hyperparameters},
        "checkpointing": {"intervalSteps": 3, "keep": 2},
        "publish": {"artifactCache": False}, "device": "cpu", "logIntervalSteps": 1, "progressIntervalSeconds": 0,
    }
    if incarnation is not None:
        document["incarnation"] = incarnation
    return load(TrainConfig, document)


def _run(config: TrainConfig, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> dict[str, Any]:
    original = loop.Training._log_metrics

    def log_then_maybe_die(self: loop.Training, record: dict[str, Any]) -> None:
        original(self, record)
        if "loss" in record and record["step"] == kill_at:
            raise Killed(record["step"])

    with monkeypatch.context() as patch:
        patch.setattr(loop.Training, "_log_metrics", log_then_maybe_die)
        return loop.run(config, None)


def _checkpoints(out: Path) -> dict[str, str | None]:
    return {p.name: checkpoint.stamp(p) for p in checkpoint.list_checkpoints(out / "checkpoints")}


@pytest.fixture(scope="module")
def new_run_alone(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, small_corpus: Path,
                  corpus: dict[str, Path]) -> tuple[dict[str, Any], str]:
    """The new incarnation's run in a directory of its own, never stopped: what it must equal anywhere."""
    out = tmp_path_factory.mktemp("alone")
    result = loop.run(_config(out, tiny_model, small_corpus, corpus, "uid-new"), None)
    return result, artifacts.read_manifest(out / "model")["digest"]


def test_a_new_incarnation_trains_its_own_run_beside_the_old_ones_checkpoints(
        tmp_path: Path, tiny_model: Path, small_corpus: Path, corpus: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        new_run_alone: tuple[dict[str, Any], str]) -> None:
    expected_result, expected_digest = new_run_alone
    # The old object trained further, with other hyperparameters, and left its checkpoints behind.
    old = _run(_config(tmp_path, tiny_model, small_corpus, corpus, "uid-old", maxSteps=12, seed=11), monkeypatch)
    assert old["steps"] == 12 and _checkpoints(tmp_path) == {"step-00000009": "uid-old", "step-00000012": "uid-old"}

    new = _config(tmp_path, tiny_model, small_corpus, corpus, "uid-new")
    with caplog.at_level(logging.INFO, logger="kubelm_runtime"), pytest.raises(Killed):
        _run(new, monkeypatch, kill_at=4)
    assert "checkpoint step-00000012 belongs to incarnation 'uid-old', this run has incarnation 'uid-new': " \
           "not resuming from it" in caplog.text
    assert "training starts fresh" in caplog.text and "resumed from" not in caplog.text
    aside = tmp_path / checkpoint.FOREIGN_DIR / "uid-old"
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000009", "step-00000012"]
    assert _checkpoints(tmp_path) == {"step-00000003": "uid-new"}

    # Restarted, it resumes its own checkpoint, and ends exactly where it would have on its own.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kubelm_runtime"):
        result = _run(new, monkeypatch)
    assert "resumed from" in caplog.text and "step-00000003" in caplog.text
    assert "not resuming from it" not in caplog.text
    assert result["attempt"] == 2 and result["steps"] == STEPS
    assert result["metrics"] == expected_result["metrics"]
    assert artifacts.read_manifest(tmp_path / "model")["digest"] == expected_digest
    assert _checkpoints(tmp_path) == {"step-00000006": "uid-new", "step-00000008": "uid-new"}
    assert json.loads((tmp_path / "result.json").read_text())["attempt"] == 2


def test_an_unstamped_checkpoint_is_not_resumed_by_a_run_with_an_incarnation(
        tmp_path: Path, tiny_model: Path, small_corpus: Path, corpus: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        new_run_alone: tuple[dict[str, Any], str]) -> None:
    expected_result, expected_digest = new_run_alone
    with pytest.raises(Killed):  # written as an older runtime or a run by hand writes: no stamp
        _run(_config(tmp_path, tiny_model, small_corpus, corpus, None, seed=11), monkeypatch, kill_at=4)
    assert _checkpoints(tmp_path) == {"step-00000003": None}

    with caplog.at_level(logging.INFO, logger="kubelm_runtime"):
        result = _run(_config(tmp_path, tiny_model, small_corpus, corpus, "uid-new"), monkeypatch)
    assert "checkpoint step-00000003 has no incarnation stamp, this run has incarnation 'uid-new'" in caplog.text
    assert "resumed from" not in caplog.text
    assert (tmp_path / checkpoint.FOREIGN_DIR / "unstamped" / "step-00000003").is_dir()
    assert result["attempt"] == 1 and result["metrics"] == expected_result["metrics"]
    assert artifacts.read_manifest(tmp_path / "model")["digest"] == expected_digest
