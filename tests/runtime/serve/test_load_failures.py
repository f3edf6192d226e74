"""A worker that cannot load its model says why in one line, in its log and its termination message,
and exits 1 (no traceback), so the operator can show the reason instead of a CrashLoopBackOff."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _truncated(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])


def _unknown_architecture(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))


def _removed(model: Path) -> None:
    shutil.rmtree(model)


@pytest.mark.parametrize(("break_it", "reason"), [
    (_truncated, "corrupt"), (_unknown_architecture, "unsupported architecture"), (_removed, "missing")])
def test_a_model_that_cannot_load_is_explained_in_one_line(tmp_path: Path, tiny_model: Path,
                                                           break_it: Callable[[Path], None], reason: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    break_it(model)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"name": "broken", "namespace": "t", "model": {"uri": str(model)},
                                      "cacheDir": str(tmp_path / "cache"), "healthPort": 0, "dtype": "fp32"}))
    termination = tmp_path / "termination-log"
    result = subprocess.run([sys.executable, "-m", "kubelm_runtime", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KUBELM_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
                                 "KUBELM_TERMINATION_LOG": str(termination), "KUBELM_MALLOC": "system"})
    assert result.returncode == 1, result.stderr
    message = termination.read_text()
    assert message.startswith(f"model {model} {reason}: "), message
    assert "\n" not in message and len(message) <= 1000
    assert "Traceback" not in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("error", "reason"), [
    (MemoryError(), "does not fit in memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "does not fit in memory"),
    (FileNotFoundError("no model directory at /m"), "missing"),
    (ValueError("Unrecognized configuration class <X> for this kind of AutoModel"), "unsupported architecture"),
    (RuntimeError("something nobody foresaw"), "cannot be loaded"),
])
def test_load_errors_are_sorted_into_what_a_person_can_act_on(error: BaseException, reason: str) -> None:
    from kubelm_runtime.models import load_failure

    message = str(load_failure(error, "hub:gpt2@main"))
    assert message.startswith(f"model hub:gpt2@main {reason}: {type(error).__name__}")
