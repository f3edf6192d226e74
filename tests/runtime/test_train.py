"""`kubelm-runtime train` as a real process: learning, kill-and-resume, DDP, Redis, artifacts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelm_contract import keys
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime import artifacts
from kubelm_runtime.redis_store import RedisStore
from support import eventually

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path], **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "jobId": "tests/tiny",
        "baseModel": {"uri": str(tiny_model)},
        "dataset": {"train": str(corpus["train"]), "validation": str(corpus["valid"]), "test": str(corpus["test"])},
        "outputDir": str(tmp_path / "out"),
        "hyperparameters": {"maxSteps": 30, "batchSize": 8, "maxLength": 64, "learningRate": 0.003,
                            "warmupSteps": 3, "evalIntervalSteps": 10, "seed": 7},
        "checkpointing": {"intervalSteps": 5, "keep": 2},
        "publish": {"artifactCache": False},
        "logIntervalSteps": 1,
        "progressIntervalSeconds": 0,
    }
    for key, value in overrides.items():
        if key in ("hyperparameters", "checkpointing", "publish"):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "kubelm_runtime", "train", "--config", str(config)]


def run_train(config: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(train_command(config), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs some steps twice)."""
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


def eval_losses(out: Path) -> list[float]:
    return [m["evalLoss"] for m in metrics(out) if "evalLoss" in m and "testLoss" not in m]


def test_short_run_lowers_validation_loss_and_writes_the_artifact(tmp_path: Path, tiny_model: Path,
                                                                 corpus: dict[str, Path]) -> None:
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"maxSteps": 60, "evalIntervalSteps": 5})
    result = run_train(config)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    evals = eval_losses(out)
    # A random 512-token model starts near ln(512) = 6.2; the tiny grammar is quickly learnable.
    assert evals[0] > evals[-1] and evals[-1] < 0.6 * 6.24, evals
    summary = json.loads((out / "result.json").read_text())
    assert summary["metrics"]["evalLoss"] == min(evals)
    best = json.loads((out / "best" / "best.json").read_text())
    step_of = {m["evalLoss"]: m["step"] for m in metrics(out) if "evalLoss" in m and "testLoss" not in m}
    assert best == {"step": step_of[min(evals)], "evalLoss": min(evals)}
    assert (out / "best" / "model.safetensors").stat().st_size > 0
    assert summary["metrics"]["testLoss"] < 0.6 * 6.24
    manifest = artifacts.read_manifest(out / "model")
    assert manifest["digest"] == artifacts.content_digest(artifacts.scan_directory(out / "model"))
    assert manifest["hyperparameters"]["maxSteps"] == 60
    assert manifest["dataset"]["fingerprint"].startswith("sha256:")
    assert manifest["baseModel"] == str(tiny_model)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000055", "step-00000060"]


def test_kill_and_resume_continues_the_same_run(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path]) -> None:
    # Killed once past step 13 (a checkpoint at 10): 60 steps leave the kill plenty of room to land
    # before the end, however fast the machine.
    steps = {"maxSteps": 60}
    reference = write_config(tmp_path / "reference", tiny_model, corpus, hyperparameters=steps)
    assert run_train(reference).returncode == 0
    expected = losses_by_step(tmp_path / "reference" / "out")

    config = write_config(tmp_path / "killed", tiny_model, corpus, hyperparameters=steps)
    out = tmp_path / "killed" / "out"
    process = subprocess.Popen(train_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    eventually(lambda: (out / "metrics.jsonl").exists() and max(losses_by_step(out), default=0) >= 13,
               timeout=120, interval=0.02, what="training reaches step 13")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(losses_by_step(out))
    assert killed_at < 60

    result = run_train(config)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    resumed = losses_by_step(out)
    assert max(resumed) == 60 == max(expected)
    # Same data order, optimizer and RNG state: the resumed curve is the uninterrupted one.
    for step in range(1, 61):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step
    assert json.loads((out / "result.json").read_text())["attempt"] == 2


def test_two_process_ddp_on_gloo(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path]) -> None:
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"maxSteps": 10, "batchSize": 4})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "kubelm_runtime", "train", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    records = metrics(out)
    assert records and {m["rank"] for m in records} == {0}
    state = json.loads((out / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    # Both ranks end with identical parameters: gradients were averaged across them.
    checksums = {}
    for line in result.stderr.splitlines():
        if "final parameter checksum" in line:
            rank = int(line.split("rank ")[-1].split()[0])
            checksums[rank] = line.rsplit(" ", 1)[-1]
    assert set(checksums) == {0, 1} and checksums[0] == checksums[1]
    assert (out / "model" / "model.safetensors").exists()


def test_progress_and_artifact_reach_redis(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path],
                                          private_redis: RedisServer) -> None:
    config = write_config(tmp_path, tiny_model, corpus, publish={"artifactCache": True, "name": "tests/tiny-lm"})
    result = run_train(config, {"KUBELM_REDIS_URL": private_redis.url})
    assert result.returncode == 0, result.stderr
    store = RedisStore(private_redis.url)
    progress = store.get_json(keys.progress("tests/tiny"))
    assert progress["phase"] == "Succeeded" and progress["step"] == progress["totalSteps"] == 30
    assert progress["percent"] == 100.0 and progress["evalLoss"] > 0 and progress["tokensPerSecond"] > 0
    assert progress["artifact"]["uri"] == "artifact://tests/tiny-lm@1"
    fetched = artifacts.fetch(store, "tests/tiny-lm", tmp_path / "fetched")
    assert fetched.digest == artifacts.read_manifest(tmp_path / "out" / "model")["digest"]

    # A second job can start from the published artifact.
    follow_up = write_config(tmp_path / "follow-up", tiny_model, corpus, jobId="tests/follow-up",
                             baseModel={"artifact": "artifact://tests/tiny-lm"},
                             hyperparameters={"maxSteps": 5})
    result = run_train(follow_up, {"KUBELM_REDIS_URL": private_redis.url})
    assert result.returncode == 0, result.stderr
    manifest = artifacts.read_manifest(tmp_path / "follow-up" / "out" / "model")
    assert manifest["baseModel"] == "artifact://tests/tiny-lm"


def test_training_survives_redis_being_down(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path],
                                            private_redis: RedisServer) -> None:
    private_redis.stop()
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"maxSteps": 10})
    result = run_train(config, {"KUBELM_REDIS_URL": private_redis.url, "KUBELM_LOG_LEVEL": "warning"})
    assert result.returncode == 0, result.stderr
    # One warning, not one per report: after the first failure Redis is left alone for its quiet period.
    assert result.stderr.count("continuing without progress reporting") == 1
    assert " INFO " not in result.stderr  # KUBELM_LOG_LEVEL: the step lines a run logs by default are hidden
    assert json.loads((tmp_path / "out" / "result.json").read_text())["steps"] == 10


def test_publishing_waits_for_redis_to_come_back(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path],
                                                private_redis: RedisServer) -> None:
    """Redis down when the model is ready to publish: the trainer retries, and once Redis is back the
    artifact is published and the run succeeds."""
    private_redis.stop()
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"maxSteps": 5},
                          publish={"artifactCache": True, "name": "tests/late-redis"})
    log = tmp_path / "train.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(train_command(config), stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "KUBELM_REDIS_URL": private_redis.url})
    try:
        eventually(lambda: "publishing failed, retrying" in log.read_text() or process.poll() is not None,
                   timeout=300, what="the first failed publish")
        assert process.poll() is None, log.read_text()
        private_redis.start()
        assert process.wait(timeout=300) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "published artifact://tests/late-redis@1" in log.read_text()
    store = RedisStore(private_redis.url)
    fetched = artifacts.fetch(store, "tests/late-redis", tmp_path / "fetched")
    assert fetched.digest == artifacts.read_manifest(tmp_path / "out" / "model")["digest"]
    assert store.get_json(keys.progress("tests/tiny"))["phase"] == "Succeeded"


def test_a_publish_that_never_succeeds_exits_1_and_keeps_the_model(
        tmp_path: Path, tiny_model: Path, corpus: dict[str, Path], private_redis: RedisServer) -> None:
    """A failure at run time that a retry may fix exits 1 (the Job retries it), saying why on its last
    line; the trained model stays in the output directory."""
    private_redis.stop()
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"maxSteps": 5},
                          publish={"artifactCache": True, "retrySeconds": 2})
    result = run_train(config, {"KUBELM_REDIS_URL": private_redis.url})
    assert result.returncode == 1, result.stderr
    assert "publishing failed, retrying" in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("kubelm_runtime.redis_store.StoreUnavailable: redis at"), last_line
    model = tmp_path / "out" / "model"
    assert artifacts.read_manifest(model)["digest"] == artifacts.content_digest(artifacts.scan_directory(model))


@pytest.mark.parametrize(("change", "message"), [
    ({"hyperparameters": {"lerningRate": 0.1}},
     "hyperparameters.lerningRate: unknown setting (did you mean 'learningRate'?)"),
    ({"hyperparameters": {"batchSize": "eight"}}, "hyperparameters.batchSize: expected an integer"),
    ({"hyperparameters": {"precision": "int4"}}, "hyperparameters.precision: 'int4' is not one of"),
    ({"baseModel": {"uri": "/m", "hub": {"id": "gpt2"}}}, "baseModel: needs exactly one of hub, uri or artifact"),
    ({"dataset": {"train": "/nonexistent/train.txt"}}, "dataset file /nonexistent/train.txt does not exist"),
    ({"jobId": "no-namespace"}, "jobId must be <namespace>/<name>"),
    ({"incarnation": ""}, "incarnation must not be empty"),
    ({"hyperparameters": {"maxLength": 4}}, "maxLength must be in [8, 131072]"),
])
def test_invalid_configuration_fails_fast(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path],
                                          change: dict, message: str) -> None:
    config = write_config(tmp_path, tiny_model, corpus, **change)
    result = run_train(config, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def test_too_little_data_is_explained(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path]) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one short line.\n")
    config = write_config(tmp_path, tiny_model, corpus, dataset={"train": str(small)})
    result = run_train(config, timeout=120)
    assert result.returncode == 2 and "unusable data: training data too small" in result.stderr


@pytest.mark.parametrize("split", ["validation", "test"])
def test_too_little_evaluation_data_fails_before_training(tmp_path: Path, tiny_model: Path,
                                                          corpus: dict[str, Path], split: str) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one short line.\n")
    dataset = {"train": str(corpus["train"]), "validation": str(corpus["valid"]), "test": str(corpus["test"]),
               split: str(small)}
    config = write_config(tmp_path, tiny_model, corpus, dataset=dataset)
    result = run_train(config, timeout=120)
    assert result.returncode == 2  # the Job's failure policy does not retry what cannot succeed
    assert f"unusable data: dataset.{split}: no complete block of 64 tokens" in result.stderr
    assert "invalid configuration" not in result.stderr
    # Refused before the first step, not after the training it would have thrown away.
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_the_configuration_file_comes_from_kubelm_config_without_a_flag(tmp_path: Path, tiny_model: Path,
                                                                       corpus: dict[str, Path]) -> None:
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"lerningRate": 0.1})
    result = subprocess.run([sys.executable, "-m", "kubelm_runtime", "train"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "KUBELM_CONFIG": str(config)})
    assert result.returncode == 2
    assert "hyperparameters.lerningRate: unknown setting" in result.stderr


def test_jsonl_data_with_accumulation_no_clipping_and_evaluation_at_epoch_ends(
        tmp_path: Path, tiny_model: Path, corpus: dict[str, Path]) -> None:
    """JSONL records through the whole trainer, gradientAccumulationSteps 2, maxGradNorm 0 (no clipping),
    evalIntervalSteps 0: evaluated exactly at the end of each epoch, and it learns."""
    jsonl = {}
    for split, path in corpus.items():
        jsonl[split] = tmp_path / f"{split}.jsonl"
        paragraphs = [p for p in path.read_text().split("\n\n") if p.strip()]
        jsonl[split].write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))
    config = write_config(tmp_path, tiny_model, corpus, dataset={
        "train": str(jsonl["train"]), "validation": str(jsonl["valid"]), "test": str(jsonl["test"]),
        "format": "jsonl", "textField": "body"}, hyperparameters={
        "maxSteps": None, "epochs": 2, "gradientAccumulationSteps": 2, "maxGradNorm": 0, "evalIntervalSteps": 0})
    result = run_train(config)
    assert result.returncode == 0, result.stderr
    per_epoch = int(re.search(r"\((\d+) per epoch\)", result.stderr)[1])  # type: ignore[index]
    evaluations = [m for m in metrics(tmp_path / "out") if "evalLoss" in m and "testLoss" not in m]
    assert [m["step"] for m in evaluations] == [per_epoch, 2 * per_epoch]
    assert evaluations[1]["evalLoss"] < evaluations[0]["evalLoss"]


def test_a_run_that_fails_says_so_in_its_progress(tmp_path: Path, tiny_model: Path, corpus: dict[str, Path],
                                                  private_redis: RedisServer) -> None:
    config = write_config(tmp_path, tiny_model, corpus, hyperparameters={"batchSize": 4096})
    result = run_train(config, {"KUBELM_REDIS_URL": private_redis.url})
    assert result.returncode == 2, result.stderr
    progress = RedisStore(private_redis.url).get_json(keys.progress("tests/tiny"))
    assert progress["phase"] == "Failed"
    assert progress["message"].startswith("DataError: training data too small")


def final_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def test_fp16_trains_with_loss_scaling_and_resumes_the_scaler(tmp_path: Path, tiny_model: Path,
                                                             corpus: dict[str, Path]) -> None:
    """fp16 autocast on CPU with a GradScaler: it learns, the scaler's state (scale, clean steps since
    the last change of scale) is checkpointed, and a resumed run carries on from it instead of starting
    a new scaler."""
    import torch

    def train(steps: int) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        config = write_config(tmp_path, tiny_model, corpus,
                              hyperparameters={"precision": "fp16", "maxSteps": steps, "evalIntervalSteps": 10})
        result = run_train(config)
        assert result.returncode == 0, result.stderr
        saved = torch.load(final_checkpoint(tmp_path / "out") / "training.pt", weights_only=False)
        return result, saved["scaler"]

    first, scaler = train(20)
    assert "precision fp16" in first.stderr
    out = tmp_path / "out"
    evals = eval_losses(out)
    assert evals[-1] < evals[0]
    assert json.loads((out / "model" / "kubelm-manifest.json").read_text())["precision"] == "fp16"
    # Every step went through the scaler: no overflow at the starting scale, so 20 clean steps counted.
    assert scaler["scale"] == torch.amp.GradScaler("cpu").get_scale()
    assert scaler["_growth_tracker"] == 20

    resumed, restored = train(30)
    assert "resumed from" in resumed.stderr
    assert restored["_growth_tracker"] == 30, "a resumed run must continue the saved scaler, not a new one"


def _without_dropout(tiny_model: Path, out: Path) -> Path:
    """The tiny model with dropout off, so two runs that see the same tokens compute the same thing."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, out)
    AutoModelForCausalLM.from_pretrained(tiny_model, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0).save_pretrained(out)
    return out


def test_gradient_accumulation_takes_the_same_step_as_one_large_batch(tmp_path: Path, tiny_model: Path,
                                                                       corpus: dict[str, Path]) -> None:
    """Two micro-batches of 4 accumulated make the same updates as one batch of 8 (and log the same loss);
    a plain batch of 4 does not, which shows the comparison can tell them apart. Compared per tensor as
    the distance between the two results relative to how far training moved it (measured: about 1e-5
    for accumulation, summation order only; 0.3-0.9 for the small batch)."""
    from safetensors.torch import load_file

    model = _without_dropout(tiny_model, tmp_path / "model")
    initial = load_file(model / "model.safetensors")

    def train(name: str, batch: int, accumulate: int) -> tuple[dict[str, Any], dict[int, float]]:
        config = write_config(tmp_path / name, model, corpus, outputDir=str(tmp_path / name / "out"),
                              hyperparameters={"maxSteps": 4, "batchSize": batch, "precision": "fp32",
                                               "gradientAccumulationSteps": accumulate, "warmupSteps": 0},
                              checkpointing={"intervalSteps": 4})
        result = run_train(config)
        assert result.returncode == 0, result.stderr
        out = tmp_path / name / "out"
        return load_file(final_checkpoint(out) / "model.safetensors"), losses_by_step(out)

    def relative_distance(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        return {name: float((a[name] - b[name]).norm() / (a[name] - initial[name]).norm())
                for name in initial if name in a and (a[name] - initial[name]).norm() > 0}

    large, large_losses = train("large", 8, 1)
    accumulated, accumulated_losses = train("accumulated", 4, 2)
    small, _ = train("small", 4, 1)
    assert accumulated_losses == pytest.approx(large_losses, rel=1e-5)
    same = relative_distance(large, accumulated)
    assert len(same) > 20 and max(same.values()) < 1e-3, same
    assert min(relative_distance(large, small).values()) > 0.05
