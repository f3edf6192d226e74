"""Training tokens/s: `kubelm-runtime train` against transformers' Trainer, measured in one run.

Both train the same GPT-2-shaped model (scaled down to finish in about a minute
on two cores) on the same packed blocks with the same batch, each in a fresh
subprocess with the same thread settings. The Trainer runs with its default
fp32 settings; kubelm runs with precision auto (bf16 where the CPU is fast at
it) and, for the loop overhead alone, with fp32 too. Steps before the timed
window are warm-up.

    python bench/train_throughput.py [--steps 40] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "tiny-corpus" / "train.txt"
SHAPES = {
    "small": {"vocab_size": 2048, "n_layer": 4, "n_head": 8, "n_embd": 512, "n_positions": 256},
    # GPT-2 124M: for the GPU run (--shape gpt2-124m --batch 32 --length 1024).
    "gpt2-124m": {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
}
SHAPE = SHAPES["small"]
BATCH, LENGTH = 8, 256


def build_model(directory: Path) -> None:
    from kubelm_runtime.tinymodel import TinyShape, build

    build(directory, [CORPUS], TinyShape(**SHAPE))


def run_kubelm(model: Path, out: Path, steps: int, warmup: int, precision: str) -> float:
    import yaml

    config = {
        "jobId": "bench/train", "baseModel": {"uri": str(model)}, "dataset": {"train": str(CORPUS)},
        "outputDir": str(out),
        "hyperparameters": {"maxSteps": steps, "batchSize": BATCH, "maxLength": LENGTH, "precision": precision,
                            "learningRate": 0.0005, "evalIntervalSteps": 0},
        "checkpointing": {"intervalSteps": steps}, "publish": {"artifactCache": False},
        "logIntervalSteps": 1,
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "kubelm_runtime", "train", "--config", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logged = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            logged[record["step"]] = record["time"]
    return (steps - warmup) * BATCH * LENGTH / (logged[steps] - logged[warmup])


def run_trainer(model_dir: Path, out: Path, steps: int, warmup: int) -> float:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from kubelm_runtime.train.data import Blocks, tokenize_file

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = Blocks(tokenize_file(CORPUS, "text", "text", tokenizer, out / "data-cache"), LENGTH)

    class PackedBlocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return blocks.count

        def __getitem__(self, i: int) -> dict:
            ids = torch.from_numpy(blocks.batch(np.array([i]))[0])
            return {"input_ids": ids, "labels": ids}

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=0.0005, report_to=[], save_strategy="no", logging_steps=steps,
                             disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=42)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=PackedBlocks(),
                      data_collator=default_data_collator, callbacks=[Clock()])
    trainer.train()
    return (steps - warmup) * BATCH * LENGTH / (marks[steps] - marks[warmup])


def main() -> None:
    global SHAPE, BATCH, LENGTH
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--only", choices=["kubelm-auto", "kubelm-fp32", "trainer"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU, for model FLOPs utilization (H100/H200 SXM: 989)")
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    SHAPE, BATCH, LENGTH = SHAPES[args.shape], args.batch, args.length
    if args.only:
        model, out = Path(args.model), Path(args.out)
        if args.only == "trainer":
            tps = run_trainer(model, out, args.steps, args.warmup)
        else:
            tps = run_kubelm(model, out, args.steps, args.warmup, args.only.split("-")[1])
        print(json.dumps({"tokensPerSecond": tps}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        results = {}
        for variant in ("trainer", "kubelm-auto", "kubelm-fp32"):
            out = Path(tmp) / variant
            out.mkdir()
            line = subprocess.run(
                [sys.executable, __file__, "--only", variant, "--model", str(model), "--out", str(out),
                 "--steps", str(args.steps), "--warmup", str(args.warmup), "--shape", args.shape,
                 "--batch", str(BATCH), "--length", str(LENGTH)],
                check=True, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            ).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(line)["tokensPerSecond"]
    base = results["trainer"]
    print(f"model: GPT-2 shape {SHAPE}, batch {BATCH} x {LENGTH} tokens, {args.steps} steps ({args.warmup} warm-up)")
    for variant, tps in results.items():
        print(f"{variant:<12} {tps:10.0f} tokens/s   {tps / base:5.2f}x Trainer (fp32 defaults)")
    import torch

    if torch.cuda.is_available():
        # Model FLOPs per token: 6 x parameters (forward + backward) + attention 12 x layers x width x length.
        width, layers = SHAPE["n_embd"], SHAPE["n_layer"]
        params = 12 * layers * width**2 + SHAPE["vocab_size"] * width
        flops_per_token = 6 * params + 12 * layers * width * LENGTH
        mfu = results["kubelm-auto"] * flops_per_token / (args.peak_tflops * 1e12)
        print(f"model FLOPs utilization (kubelm-auto, {torch.cuda.get_device_name()}): {100 * mfu:.1f}%")


if __name__ == "__main__":
    main()
