"""The training loop: a plain torch loop over packed blocks, data-parallel when asked.

Chosen over transformers' Trainer because it is simpler to make resumable at an
exact data position and faster on our hardware (bench/train_throughput.py):
no data-loader processes, bf16 autocast where the CPU or GPU is fast at it,
foreach/fused AdamW.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel

from kubelm_contract.settings import dump

from .. import artifacts, models
from ..atomic import atomic_directory
from ..progress import ProgressReporter
from ..redis_store import RedisStore, StoreUnavailable
from . import checkpoint, distributed, precision
from .data import Blocks, TokenFile, epoch_order, eval_shard, tokenize_file
from .distributed import World
from .errors import DataError
from .settings import TrainConfig

log = logging.getLogger(__name__)


def pick_device(requested: str, world: World) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but no CUDA device is visible")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def lr_lambda(schedule: str, warmup: int, total: int):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm weights (1-D) are not regularised."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Training:
    def __init__(self, config: TrainConfig, world: World, device: torch.device, redis_url: str | None):
        self.config = config
        self.hp = config.hyperparameters
        self.world = world
        self.device = device
        self.out = Path(config.output_dir)
        self.redis_url = redis_url
        self.store = RedisStore(redis_url) if redis_url else None
        self.reporter = ProgressReporter(redis_url if world.is_writer else None, config.job_id,
                                         config.progress_interval_seconds, incarnation=config.incarnation)
        self.precision = precision.resolve(self.hp.precision, device)
        self.metrics_path = self.out / "metrics.jsonl"

    # -- set-up ---------------------------------------------------------------------------------
    def _rank0_first(self, fn):  # type: ignore[no-untyped-def]
        """Runs fn on rank 0, then on the others: they reuse its result on a shared volume."""
        result = fn() if self.world.is_writer else None
        distributed.barrier(self.world)
        if not self.world.is_writer:
            result = fn()
        distributed.barrier(self.world)
        return result

    def _tokenize(self, uri: str | None) -> TokenFile | None:
        if uri is None:
            return None
        from kubelm_contract.volumes import local_path

        ds = self.config.dataset
        return self._rank0_first(lambda: tokenize_file(
            Path(local_path(uri)), ds.format, ds.text_field, self.tokenizer, self.out / "data-cache"))

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.world.is_writer:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps({**record, "rank": self.world.rank, "time": time.time()}) + "\n")

    def _progress(self, force: bool = False, **fields: Any) -> None:
        if self.world.is_writer:
            self.reporter.report({**self.reporter.latest, **fields, "worldSize": self.world.size}, force=force)

    # -- main -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, hp, world = self.config, self.hp, self.world
        self.out.mkdir(parents=True, exist_ok=True)
        self._progress(force=True, phase="Running", step=0)
        source = cfg.base_model
        reference, revision = self._rank0_first(lambda: models.resolve(source, self.store, self.out / "cache"))
        tokenizer_ref = reference if source.tokenizer is None else source.tokenizer
        self.tokenizer = models.load_tokenizer(tokenizer_ref, revision if source.tokenizer is None else None)

        train_tokens = self._tokenize(cfg.dataset.train)
        assert train_tokens is not None
        validation_tokens = self._tokenize(cfg.dataset.validation)
        test_tokens = self._tokenize(cfg.dataset.test)
        self.token_files = [train_tokens, validation_tokens, test_tokens]
        train = Blocks(train_tokens, hp.max_length)
        validation = Blocks(validation_tokens, hp.max_length) if validation_tokens else None
        test = Blocks(test_tokens, hp.max_length) if test_tokens else None
        micro_batches = len(epoch_order(train.count, hp.seed, 0, world.rank, world.size, hp.batch_size)) \
            // hp.batch_size
        steps_per_epoch = micro_batches // hp.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise DataError(
                f"training data too small: {train.count} blocks of {hp.max_length} tokens cannot fill one step of "
                f"{world.size} worker(s) x batchSize {hp.batch_size} x gradientAccumulationSteps "
                f"{hp.gradient_accumulation_steps}; lower maxLength or batchSize, or add data")
        for field, blocks in (("dataset.validation", validation), ("dataset.test", test)):
            # Found now, not at the first evaluation (or after the whole run, for the test set).
            if blocks is not None and blocks.count == 0:
                raise DataError(f"{field}: no complete block of {hp.max_length} tokens to evaluate on; lower "
                                f"maxLength or add data")
        total_steps = hp.max_steps or hp.epochs * steps_per_epoch

        torch.manual_seed(hp.seed + world.rank)
        np.random.seed(hp.seed + world.rank)
        model = models.load_causal_lm(reference, revision).to(self.device)
        model.config.use_cache = False
        model.train()
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(param_groups(model, hp.weight_decay), lr=hp.learning_rate,
                                      betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.lr_schedule, hp.warmup_steps,
                                                                            total_steps))
        scaler = torch.amp.GradScaler(self.device.type) if self.precision.loss_scaling else None

        state: dict[str, Any] = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None,
                 "tokens_seen": 0, "attempt": 1}
        ckpt_dir = self.out / "checkpoints"
        # Before the broadcast: the other ranks look for the checkpoint only after rank 0 has moved these.
        set_aside = checkpoint.set_aside_foreign(ckpt_dir, cfg.incarnation) if world.is_writer else []
        resume_from = distributed.broadcast_object(world, str(checkpoint.latest(ckpt_dir) or ""))
        if resume_from:
            if not Path(resume_from).is_dir():
                raise RuntimeError(f"rank {world.rank} cannot see checkpoint {resume_from}: "
                                   "multi-worker resume needs shared storage (storage.type pvc)")
            state, rng_states = checkpoint.load(Path(resume_from), model, optimizer, scheduler, scaler)
            state["attempt"] = int(state.get("attempt", 1)) + 1
            checkpoint.set_rng_state(rng_states[world.rank] if world.rank < len(rng_states) else rng_states[0])
            log.info("resumed from %s at step %d (attempt %d)", resume_from, state["global_step"], state["attempt"])
        elif set_aside:
            log.warning("no checkpoint of this run's incarnation: training starts fresh")

        raw_model = model
        if world.enabled:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if fused else None)

        log.info("training %s on %s x%d, precision %s, %d steps (%d per epoch), %d train blocks of %d tokens",
                 source.describe(), self.device.type, world.size, self.precision.name, total_steps,
                 steps_per_epoch, train.count, hp.max_length)
        tokens_per_step = hp.batch_size * hp.max_length * hp.gradient_accumulation_steps * world.size
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        step = int(state["global_step"])
        epoch = int(state["epoch"])
        step_in_epoch = int(state["step_in_epoch"])

        while step < total_steps:
            order = epoch_order(train.count, hp.seed, epoch, world.rank, world.size, hp.batch_size)
            while step_in_epoch < steps_per_epoch and step < total_steps:
                step_loss = 0.0
                for micro in range(hp.gradient_accumulation_steps):
                    first = (step_in_epoch * hp.gradient_accumulation_steps + micro) * hp.batch_size
                    batch = torch.from_numpy(train.batch(order[first:first + hp.batch_size])).to(self.device)
                    last_micro = micro == hp.gradient_accumulation_steps - 1
                    sync = nullcontext() if last_micro or not world.enabled else model.no_sync()  # type: ignore[operator]
                    with sync, self.precision.autocast(self.device):
                        loss = model(input_ids=batch, labels=batch).loss / hp.gradient_accumulation_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += loss.detach().float().item()
                if scaler:
                    scaler.unscale_(optimizer)
                if hp.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), hp.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_in_epoch += 1
                state["tokens_seen"] = int(state["tokens_seen"]) + tokens_per_step
                window_loss += step_loss
                window_steps += 1
                fractional_epoch = epoch + step_in_epoch / steps_per_epoch

                if step % cfg.log_interval_steps == 0 or step == total_steps:
                    mean_loss = distributed.all_sum(world, [window_loss / window_steps], self.device)[0] / world.size
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * tokens_per_step / elapsed
                    eta = int((total_steps - step) * elapsed / window_steps)
                    self._log_metrics({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                                       "epoch": fractional_epoch, "tokensPerSecond": tps})
                    self._progress(step=step, totalSteps=total_steps, epoch=round(fractional_epoch, 4),
                                   loss=round(mean_loss, 5), tokensPerSecond=round(tps, 1),
                                   percent=round(100 * step / total_steps, 1), etaSeconds=eta,
                                   attempt=state["attempt"])
                    if world.is_writer:
                        log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.0f tokens/s eta %ds", step, total_steps,
                                 fractional_epoch, mean_loss, scheduler.get_last_lr()[0], tps, eta)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

                end_of_epoch = step_in_epoch == steps_per_epoch
                due = hp.eval_interval_steps and step % hp.eval_interval_steps == 0
                if validation and (due or end_of_epoch or step == total_steps):
                    eval_loss: float = self.evaluate(raw_model, validation)
                    self._log_metrics({"step": step, "evalLoss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))})
                    self._progress(force=True, evalLoss=round(eval_loss, 5))
                    best = state["best_eval_loss"]
                    if best is None or eval_loss < float(best):
                        state["best_eval_loss"] = eval_loss
                        if world.is_writer:
                            with atomic_directory(self.out / "best") as tmp:
                                save_model(raw_model, str(tmp / "model.safetensors"))
                                (tmp / "best.json").write_text(json.dumps({"step": step, "evalLoss": eval_loss}))
                if end_of_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                if step % cfg.checkpointing.interval_steps == 0 or step == total_steps:
                    state.update(global_step=step, epoch=epoch, step_in_epoch=step_in_epoch,
                                 total_steps=total_steps, world_size=world.size)
                    self._checkpoint(step, raw_model, optimizer, scheduler, scaler, state)
                if end_of_epoch:
                    break  # the next epoch draws its own order in the outer loop

        # The DDP wrapper sits in reference cycles; collect it now, while its process group is alive,
        # rather than at interpreter exit, where its gloo work objects abort the process.
        del model
        gc.collect()
        return self._finish(raw_model, validation, test, state, total_steps)

    def _checkpoint(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, state: dict[str, Any]) -> None:
        rng_states = distributed.gather_objects(self.world, checkpoint.rng_state())
        if self.world.is_writer:
            path = checkpoint.save(self.out / "checkpoints", step, model, optimizer, scheduler, scaler, rng_states,
                                   state, self.config.checkpointing.keep, incarnation=self.config.incarnation)
            log.info("checkpoint %s", path.name)
        distributed.barrier(self.world)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, blocks: Blocks) -> float:
        model.eval()
        total, count = 0.0, 0.0
        indices = eval_shard(blocks.count, self.world.rank, self.world.size)
        for start in range(0, len(indices), self.hp.batch_size):
            batch = torch.from_numpy(blocks.batch(indices[start:start + self.hp.batch_size])).to(self.device)
            with self.precision.autocast(self.device):
                loss = model(input_ids=batch, labels=batch).loss.float().item()
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += loss * predicted
            count += predicted
        model.train()
        total, count = distributed.all_sum(self.world, [total, count], self.device)
        if count == 0:
            raise DataError(f"evaluation data has no complete block of {self.hp.max_length} tokens")
        return total / count

    def _finish(self, model: torch.nn.Module, validation: Blocks | None, test: Blocks | None,
                state: dict[str, Any], total_steps: int) -> dict[str, Any]:
        best_dir = self.out / "best"
        if validation is not None and (best_dir / "model.safetensors").exists():
            load_model(model, str(best_dir / "model.safetensors"))
        metrics: dict[str, float] = {}
        if state.get("best_eval_loss") is not None:
            metrics["evalLoss"] = float(state["best_eval_loss"])
            metrics["evalPerplexity"] = math.exp(min(metrics["evalLoss"], 50))
        if test is not None:
            metrics["testLoss"] = self.evaluate(model, test)
            metrics["testPerplexity"] = math.exp(min(metrics["testLoss"], 50))
            self._log_metrics({"step": total_steps, **metrics})
        checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
        log.info("rank %d final parameter checksum %.6f", self.world.rank, checksum)
        result: dict[str, Any] = {"steps": total_steps, "metrics": metrics, "attempt": state["attempt"]}
        if self.world.is_writer:
            result.update(self._write_model(model, metrics))
            self._progress(force=True, phase="Succeeded", step=total_steps, totalSteps=total_steps, percent=100.0,
                           etaSeconds=0, artifact=result["artifact"])
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
        distributed.barrier(self.world)
        return result

    def _write_model(self, model: Any, metrics: dict[str, float]) -> dict[str, Any]:
        final = self.out / "model"
        with atomic_directory(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            files = artifacts.scan_directory(tmp)
            manifest = {
                "digest": artifacts.content_digest(files),
                "baseModel": self.config.base_model.describe(),
                "dataset": {
                    "fingerprint": self._dataset_fingerprint(),
                    **{k: v for k, v in dump(self.config.dataset).items()},
                },
                "hyperparameters": dump(self.config.hyperparameters),
                "precision": self.precision.name,
                "worldSize": self.world.size,
                "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            }
            (tmp / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        artifact: dict[str, Any] = {"uri": str(final), "digest": manifest["digest"], "metrics": metrics}
        if self.config.publish.artifact_cache and self.store is not None:
            stored = self._publish_with_retry(final)
            artifact.update(uri=stored.uri, version=stored.version)
            log.info("published %s (%.1f MiB, %s)", stored.uri, stored.size / 2**20, stored.digest)
        elif self.config.publish.artifact_cache:
            log.warning("publish.artifactCache is on but KUBELM_REDIS_URL is not set; model left in %s", final)
        return {"artifact": artifact, "manifest": manifest}

    def _publish_with_retry(self, directory: Path) -> artifacts.StoredArtifact:
        """Hours of training must not be lost to a Redis restart: retry for a while before failing."""
        publish = self.config.publish
        deadline = time.monotonic() + publish.retry_seconds
        delay = 1.0
        while True:
            try:
                return artifacts.publish(self.store, directory, self.config.artifact_name,  # type: ignore[arg-type]
                                         chunk_bytes=publish.chunk_bytes, max_bytes=publish.max_bytes)
            except StoreUnavailable as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("publishing failed, retrying in %.0fs: %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _dataset_fingerprint(self) -> str:
        """sha256 over the train, validation and test file digests, in that order."""
        h = hashlib.sha256()
        for token_file in self.token_files:
            h.update(f"{token_file.source_digest if token_file else '-'}\n".encode())
        return "sha256:" + h.hexdigest()


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def run(config: TrainConfig, redis_url: str | None) -> dict[str, Any]:
    world = distributed.world_from_env()
    device = pick_device(config.device, world)
    distributed.init(world, device)
    training = Training(config, world, device, redis_url)
    try:
        result = training.run()
    except BaseException as e:
        # No collective teardown here: peers may be blocked in a collective, and destroying the group
        # would hang; the launcher stops them once this process exits non-zero.
        training._progress(force=True, phase="Failed", message=f"{type(e).__name__}: {e}"[:1000])
        raise
    distributed.shutdown()
    return result

