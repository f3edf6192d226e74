"""Pure pieces of the trainer: data order, documents, precision, schedules, checkpoints, world."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kubelm_runtime.cpu import cpu_has_fast_bf16, cpu_model
from kubelm_runtime.train import checkpoint
from kubelm_runtime.train.data import DataError, epoch_order, iter_documents
from kubelm_runtime.train.distributed import world_from_env
from kubelm_runtime.train.loop import lr_lambda, param_groups
from kubelm_runtime.train.precision import resolve


def test_epoch_order_is_deterministic_disjoint_and_even() -> None:
    a0 = epoch_order(103, seed=1, epoch=0, rank=0, world=2, batch_size=4)
    a1 = epoch_order(103, seed=1, epoch=0, rank=1, world=2, batch_size=4)
    assert np.array_equal(a0, epoch_order(103, 1, 0, 0, 2, 4))
    assert len(a0) == len(a1) == 48 and not set(a0) & set(a1)
    assert not np.array_equal(a0, epoch_order(103, 1, 1, 0, 2, 4))


def test_documents_from_lines_paragraphs_and_jsonl(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\n")
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("a\nb\n\nc\n")
    records = tmp_path / "data.jsonl"
    records.write_text('{"content": "x"}\n\n{"content": "y"}\n')
    assert list(iter_documents(lines, "text", "text")) == ["one\ntwo"]
    assert list(iter_documents(paragraphs, "text", "text")) == ["a\nb", "c"]
    no_blank = tmp_path / "no-blank.txt"
    no_blank.write_text("one\ntwo\n")
    assert list(iter_documents(no_blank, "text", "text")) == ["one", "two"]
    assert list(iter_documents(records, "jsonl", "content")) == ["x", "y"]
    with pytest.raises(DataError, match=r"data.jsonl:1: no string field 'text'"):
        list(iter_documents(records, "jsonl", "text"))
    records.write_text("{broken\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: not valid JSON"):
        list(iter_documents(records, "jsonl", "text"))


def test_precision_choice() -> None:
    assert cpu_has_fast_bf16("flags : fpu avx2 avx512f avx512_bf16")
    assert cpu_has_fast_bf16("flags : amx_bf16 amx_tile")
    assert not cpu_has_fast_bf16("flags : fpu avx2")
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: fpu") == "AMD EPYC 9R14"
    assert cpu_model("flags : fpu") == "unknown"
    cpu = torch.device("cpu")
    assert resolve("fp32", cpu).autocast_dtype is None
    assert resolve("bf16", cpu).autocast_dtype is torch.bfloat16
    assert resolve("fp16", cpu).loss_scaling
    assert resolve("auto", cpu, cpuinfo="flags : fpu avx2 avx512_bf16").name == "bf16"
    assert resolve("auto", cpu, cpuinfo="flags : fpu avx2").name == "fp32"
    assert resolve("fp32", cpu, cpuinfo="flags : amx_bf16").autocast_dtype is None  # asked for: kept


def test_schedules() -> None:
    linear = lr_lambda("linear", warmup=10, total=110)
    assert linear(0) == pytest.approx(0.1) and linear(9) == 1.0
    assert linear(60) == pytest.approx(0.5) and linear(110) == 0.0
    cosine = lr_lambda("cosine", warmup=0, total=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    assert lr_lambda("constant", 5, 100)(80) == 1.0


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.ndim for p in decay["params"]] == [2]
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


class _FailingScaler:
    def state_dict(self) -> dict:
        raise RuntimeError("the process dies here, halfway through writing a checkpoint")


def _trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def test_checkpoints_restore_optimizer_and_scheduler_state(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained(5)
    saved = checkpoint.save(tmp_path, 5, model, optimizer, scheduler, None, [checkpoint.rng_state()],
                            {"global_step": 5}, keep=2, incarnation="uid-1")
    fresh = torch.nn.Linear(3, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0 / (1 + s))
    state, rng = checkpoint.load(saved, fresh, fresh_optimizer, fresh_scheduler, None)
    assert state == {"global_step": 5} and len(rng) == 1
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_scheduler.last_epoch == 5 and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 6)
    for p_old, p_new in zip(model.parameters(), fresh.parameters(), strict=True):
        old, new = optimizer.state[p_old], fresh_optimizer.state[p_new]
        assert torch.equal(old["exp_avg"], new["exp_avg"]) and torch.equal(old["exp_avg_sq"], new["exp_avg_sq"])
        assert int(old["step"]) == int(new["step"]) == 5


def test_a_checkpoint_interrupted_mid_write_is_never_listed_and_old_ones_are_pruned(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained(1)
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, step, model, optimizer, scheduler, None, [checkpoint.rng_state()],
                        {"global_step": step}, keep=2, incarnation=None)
    with pytest.raises(RuntimeError, match="halfway"):  # the weights are written, the rest is not
        checkpoint.save(tmp_path, 20, model, optimizer, scheduler, _FailingScaler(), [], {"global_step": 20},
                        keep=2, incarnation=None)
    # The failed write left nothing behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000015"]
    (tmp_path / ".step-00000020.tmp-killed").mkdir()  # what a process killed mid-write leaves behind
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010", "step-00000015"]
    latest = checkpoint.latest(tmp_path)
    assert latest is not None and latest.name == "step-00000015"
    checkpoint.save(tmp_path, 25, model, optimizer, scheduler, None, [], {"global_step": 25}, keep=2,
                    incarnation=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000015", "step-00000025"]  # leftovers gone


def test_a_checkpoint_is_stamped_and_the_stamp_stays_out_of_the_trainer_state(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained(1)
    stamped = checkpoint.save(tmp_path, 5, model, optimizer, scheduler, None, [checkpoint.rng_state()],
                              {"global_step": 5, "incarnation": "stale"}, keep=2, incarnation="uid-1")
    assert json.loads((stamped / checkpoint.STATE_FILE).read_text()) == {"global_step": 5, "incarnation": "uid-1"}
    assert checkpoint.stamp(stamped) == "uid-1"
    state, _ = checkpoint.load(stamped, model, optimizer, scheduler, None)
    assert state == {"global_step": 5}
    unstamped = checkpoint.save(tmp_path, 10, model, optimizer, scheduler, None, [checkpoint.rng_state()],
                                {"global_step": 10}, keep=2, incarnation=None)
    assert json.loads((unstamped / checkpoint.STATE_FILE).read_text()) == {"global_step": 10}
    assert checkpoint.stamp(unstamped) is None


@pytest.mark.parametrize(("ours", "foreign", "folder"), [
    ("uid-new", "uid-old", "uid-old"),
    ("uid-new", None, "unstamped"),  # an older runtime's: nothing shows it was this run's
    (None, "uid-old", "uid-old"),  # a run by hand does not resume an operator's run
    ("uid-new", "../../x y", "______x_y"),  # the stamp names a folder, never a path
])
def test_checkpoints_of_another_incarnation_are_moved_aside_and_never_pruned_over_ours(
        tmp_path: Path, ours: str | None, foreign: str | None, folder: str,
        caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer, scheduler = _trained(1)
    directory = tmp_path / "checkpoints"

    def save(step: int, incarnation: str | None, keep: int = 2) -> None:
        checkpoint.save(directory, step, model, optimizer, scheduler, None, [], {"global_step": step}, keep=keep,
                        incarnation=incarnation)

    save(5, ours, keep=3)  # this run's own, from before a restart
    for step in (90, 100):  # the other run got further than this one will
        save(step, foreign, keep=3)
    with caplog.at_level(logging.WARNING, logger="kubelm_runtime"):
        moved = checkpoint.set_aside_foreign(directory, ours)
    aside = tmp_path / "foreign-checkpoints" / folder
    assert moved == [aside / "step-00000090", aside / "step-00000100"]
    assert all(checkpoint.stamp(path) == foreign for path in moved)
    assert [p.name for p in checkpoint.list_checkpoints(directory)] == ["step-00000005"]
    found = f"belongs to incarnation {foreign!r}" if foreign else "has no incarnation stamp"
    this = f"this run has incarnation {ours!r}" if ours else "this run has no incarnation"
    assert f"checkpoint step-00000100 {found}, {this}: not resuming from it, moved to {aside}" in caplog.text
    save(10, ours)
    save(15, ours)
    assert [p.name for p in checkpoint.list_checkpoints(directory)] == ["step-00000010", "step-00000015"]
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000090", "step-00000100"]  # kept, not deleted
    assert checkpoint.set_aside_foreign(directory, ours) == []


def test_world_from_env() -> None:
    assert world_from_env({}).size == 1
    torchrun = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.size, torchrun.is_writer) == (1, 2, False)
    assert world_from_env({"JOB_COMPLETION_INDEX": "3", "WORLD_SIZE": "4"}).rank == 3
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
