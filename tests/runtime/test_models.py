"""The real from_pretrained path on a hub id, served from a local hub cache with the network off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from kubelm_runtime.config import HubModel, ModelSource
from kubelm_runtime.models import load_causal_lm, load_tokenizer, resolve
ref, revision = resolve(ModelSource(hub=HubModel(id="kubelm-tests/tiny-gpt2")), None, None)
model = load_causal_lm(ref, revision)
tokenizer = load_tokenizer(ref, revision)
print(type(model).__name__, tokenizer.pad_token == tokenizer.eos_token, ref, revision)
"""


def test_hub_id_loads_through_from_pretrained_offline(tmp_path: Path, tiny_model: Path) -> None:
    # The layout huggingface_hub keeps for a downloaded repository: refs/<revision> -> snapshot.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kubelm-tests--tiny-gpt2"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GPT2LMHeadModel", "True", "kubelm-tests/tiny-gpt2", "main"]
