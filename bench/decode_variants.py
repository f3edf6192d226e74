"""Decode-step time of the serving engine's options, in one run: dtype, dynamic or static KV cache,
eager or torch.compile, then what the engine uses: the cache that grows in place, linear weights
packed for oneDNN, and the lean GPT-2 forward. GPT-2 124M shapes (vocabulary 2048), 16-token
prompts, greedy.

    python bench/decode_variants.py [--steps 32]

Each variant runs in a fresh subprocess; the first line is the baseline (fp32, dynamic cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = [("float32", "dynamic"), ("bfloat16", "dynamic"), ("bfloat16", "static"), ("bfloat16", "compiled"),
            ("bfloat16", "growing"), ("bfloat16", "packed"), ("bfloat16", "lean")]


def measure_engine(model: object, batch: int, mode: str, steps: int, warmup: int) -> float:
    """Seconds per step with the serving engine's cache, packing and (for "lean") forward pass."""
    import torch

    from kubelm_runtime.serve import gpt2, packing
    from kubelm_runtime.serve.kvcache import GrowingCache

    lean = gpt2.build(model, batch) if mode == "lean" else None
    if mode == "packed":
        packing.pack_linears(model, batch)  # type: ignore[arg-type]

    def forward(ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                cache: GrowingCache) -> torch.Tensor:
        if lean is not None:
            return lean(ids, positions, attention, cache)
        return model(input_ids=ids, attention_mask=attention, position_ids=positions,  # type: ignore[operator]
                     past_key_values=cache, use_cache=True).logits[:, -1].float()

    cache = GrowingCache()
    attention = torch.ones(batch, 16, dtype=torch.long)
    positions = torch.arange(16).expand(batch, 16)
    token = forward(torch.randint(0, 2048, (batch, 16)), attention, positions, cache).argmax(-1)
    position = torch.full((batch, 1), 16)
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
        token = forward(token[:, None], attention, position, cache).argmax(-1)
        position = position + 1
    return (time.perf_counter() - started) / steps


def measure(batch: int, dtype_name: str, mode: str, steps: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import StaticCache

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=2048, n_layer=12, n_head=12, n_embd=768, n_positions=512)
    dtype = getattr(torch, dtype_name)
    model = GPT2LMHeadModel(config).eval().to(dtype)
    prompt = torch.randint(0, 2048, (batch, 16))
    forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
    warmup, compile_seconds = 3, 0.0

    with torch.inference_mode():
        if mode in ("growing", "packed", "lean"):
            return {"ms": measure_engine(model, batch, mode, steps, warmup) * 1000, "warmup_s": 0.0}
        if mode == "dynamic":
            out = model(input_ids=prompt, use_cache=True)
            cache = out.past_key_values
        else:
            cache = StaticCache(config=config, max_batch_size=batch, max_cache_len=16 + warmup + steps + 1,
                                device="cpu", dtype=dtype)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(16))
        token = out.logits[:, -1].argmax(-1)
        started = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup:
                compile_seconds = time.perf_counter() - started
                started = time.perf_counter()
            kwargs = {} if mode == "dynamic" else {"cache_position": torch.tensor([16 + i])}
            out = forward(input_ids=token[:, None], past_key_values=cache, use_cache=True, **kwargs)
            cache = out.past_key_values if mode == "dynamic" else cache
            token = out.logits[:, -1].argmax(-1)
        step = (time.perf_counter() - started) / steps
    return {"ms": step * 1000, "warmup_s": compile_seconds}


def main() -> None:
    from kubelm_runtime import allocator

    allocator.reexec_with_jemalloc()  # as the serving worker runs (the variants inherit it)
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--one", nargs=3, metavar=("BATCH", "DTYPE", "MODE"))
    args = parser.parse_args()
    if args.one:
        batch, dtype, mode = args.one
        print(json.dumps(measure(int(batch), dtype, mode, args.steps)))
        return
    print(f"ms per decode step, GPT-2 124M shapes (vocabulary 2048), {args.steps} steps after 3 warm-up, "
          f"{allocator.in_use()} malloc")
    for batch in (1, 32):
        base = None
        for dtype, mode in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", str(batch), dtype, mode, "--steps",
                                  str(args.steps)], check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            base = base or result["ms"]
            extra = f"  (warm-up incl. compile {result['warmup_s']:.0f} s)" if mode == "compiled" else ""
            print(f"batch {batch:>2}  {dtype:<9} {mode:<9} {result['ms']:7.1f} ms   {base / result['ms']:4.2f}x{extra}")


if __name__ == "__main__":
    main()
