"""Serving speed, measured against baselines from the same run.

Model: GPT-2 124M shapes (12 layers, 768 wide, 12 heads) with the tiny corpus's
2048-token vocabulary, random weights, built from config. Every figure counts
generated tokens, since a random model may stop early at EOS.

1. Throughput, 32 concurrent requests through gateway + RabbitMQ + worker
   (precision auto), against transformers' generate one request at a time (fp32,
   the library's default) and against the worker's engine in-process on the
   same batch (queue overhead).
2. Added latency of the queue path: p50 of single short requests through the
   gateway minus p50 of the same request in-process.
3. Roofline: batch-1 decode against memory bandwidth (weight bytes per step over
   measured copy bandwidth), batch-32 decode against measured matmul peak.
4. Response cache: p50 of a cache hit at the gateway against a miss.

    python bench/serve_throughput.py [--requests 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from kubelm_contract.protocol import Decoding
from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.probes import http_get, wait_for
from kubelm_runtime.serve.batching import Batcher
from kubelm_runtime.serve.engine import Engine, Item
from kubelm_runtime.tinymodel import TinyShape, build

REPO = Path(__file__).resolve().parents[1]
SHAPE = TinyShape(vocab_size=2048, n_layer=12, n_head=12, n_embd=768, n_positions=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompts(n: int, tag: str) -> list[str]:
    return [f"{tag} {i}: the old fox runs to the river and the owl" for i in range(n)]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def tokens_per_second(run) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - started
    return tokens / elapsed, elapsed


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write)."""
    source = np.ones(256 * 2**20 // 8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def matmul_peak(dtype: torch.dtype) -> float:
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best


def hf_sequential(model_dir: Path, n: int, tokens: int) -> float:
    """transformers' generate, one request at a time, fp32 (the library's default)."""
    baseline = Engine.load(str(model_dir), dtype="fp32")

    def run() -> int:
        count = 0
        for prompt in prompts(n, "hf"):
            ids = baseline.tokenizer(prompt, return_tensors="pt")
            out = baseline.model.generate(**ids, max_new_tokens=tokens, do_sample=True, temperature=0.7, top_k=50,
                                          pad_token_id=baseline.tokenizer.eos_token_id)
            count += out.shape[1] - ids["input_ids"].shape[1]
        return count

    return tokens_per_second(run)[0]


def in_process(model_dir: Path, n: int, tokens: int, max_wait: float) -> dict:
    """The worker's engine and batcher without the queue: the reference for the queue's overhead."""
    engine = Engine.load(str(model_dir), dtype="auto")
    sampled = Decoding(max_new_tokens=tokens, temperature=0.7, top_k=50)
    engine.generate([Item(p, sampled) for p in prompts(n, "warm")])
    tps = tokens_per_second(
        lambda: sum(o.completion_tokens for o in engine.generate([Item(p, sampled) for p in prompts(n, "ip")])))[0]
    latency = []
    for i in range(30):
        batcher: Batcher[Item] = Batcher(n, max_wait)
        started = time.perf_counter()
        batcher.add(Item(f"latency {i}", Decoding(max_new_tokens=1, temperature=0)), time.monotonic())
        time.sleep(batcher.time_left(time.monotonic()) or 0)
        engine.generate(batcher.take(time.monotonic()))
        latency.append(time.perf_counter() - started)
    # Decode steps for the rooflines.
    roof = Decoding(max_new_tokens=64, temperature=0.7)
    engine.generate([Item("roofline", roof)])
    started = time.perf_counter()
    one = engine.generate([Item("roofline", roof)])[0]
    step_1 = (time.perf_counter() - started) / max(1, one.completion_tokens)
    started = time.perf_counter()
    outs = engine.generate([Item(p, roof) for p in prompts(32, "roof")])
    step_32 = (time.perf_counter() - started) / max(1, max(o.completion_tokens for o in outs))
    parameters = list(engine.model.parameters())
    return {"tps": tps, "latency": latency, "step_1": step_1, "step_32": step_32,
            "weight_bytes": sum(p.numel() * p.element_size() for p in parameters),
            "params": sum(p.numel() for p in parameters), "dtype": parameters[0].dtype}


def queue_path(model_dir: Path, n: int, tokens: int, max_wait: float, tmp: Path) -> dict:
    """A dev cluster's RabbitMQ and Redis, a worker and a gateway as processes, driven over HTTP."""
    cluster = devcluster.up(tmp / "cluster")
    processes = []
    try:
        connection = {**os.environ, **cluster.env()}
        gateway_port, health_port = free_port(), free_port()
        configs = {
            "serve": {"name": "bench", "model": {"uri": str(model_dir)}, "cacheDir": str(tmp / "cache"),
                      "healthPort": health_port, "limits": {"maxNewTokens": 256},
                      "batching": {"maxBatchSize": n, "maxWaitMillis": int(max_wait * 1000)}},
            "gateway": {"port": gateway_port, "host": "127.0.0.1", "requestTimeoutSeconds": 600},
        }
        for kind, config in configs.items():
            (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(config))
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "kubelm_runtime", kind, "--config", str(tmp / f"{kind}.yaml")],
                env=connection, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("worker", lambda: http_get(f"http://127.0.0.1:{health_port}/readyz")[0] == 200, 300)
        wait_for("gateway", lambda: http_get(f"http://127.0.0.1:{gateway_port}/readyz")[0] == 200, 60)
        url = f"http://127.0.0.1:{gateway_port}/v1/completions"

        def concurrent(tag: str) -> int:
            with ThreadPoolExecutor(max_workers=n) as pool:
                replies = list(pool.map(lambda p: post(url, {
                    "model": "bench", "prompt": p, "max_tokens": tokens, "temperature": 0.7, "top_k": 50}),
                    prompts(n, tag)))
            return sum(r["usage"]["completion_tokens"] for r in replies)

        def timed(body: dict) -> float:
            started = time.perf_counter()
            reply = post(url, {"model": "bench", **body})
            elapsed = time.perf_counter() - started
            timed.last = reply  # type: ignore[attr-defined]
            return elapsed

        concurrent("warm")
        tps = tokens_per_second(lambda: concurrent("q"))[0]
        latency = [timed({"prompt": f"latency {i}", "max_tokens": 1, "temperature": 0}) for i in range(30)]
        misses = [timed({"prompt": f"cache {i}", "max_tokens": tokens, "temperature": 0}) for i in range(20)]
        hits = [timed({"prompt": "cache 0", "max_tokens": tokens, "temperature": 0}) for _ in range(50)]
        assert timed.last["kubelm"]["cached"]  # type: ignore[attr-defined]
        return {"tps": tps, "latency": latency, "misses": misses, "hits": hits}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        devcluster.down(tmp / "cluster")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    args = parser.parse_args()
    n, tokens, max_wait = args.requests, args.tokens, args.max_wait_ms / 1000

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build(tmp / "model", [REPO / "examples/tiny-corpus/train.txt"], SHAPE)
        hf_tps = hf_sequential(model_dir, n, tokens)
        local = in_process(model_dir, n, tokens, max_wait)
        queued = queue_path(model_dir, n, tokens, max_wait, tmp)
        bandwidth, peak = memory_bandwidth(), matmul_peak(local["dtype"])

    print(f"model: GPT-2 124M shapes, vocabulary 2048, {local['params'] / 1e6:.0f}M parameters; serving "
          f"{local['dtype']}; {n} requests x {tokens} new tokens; batching wait {args.max_wait_ms} ms; "
          f"{torch.get_num_threads()} threads")
    print(f"transformers generate, one at a time (fp32)    {hf_tps:8.0f} tokens/s   1.00x")
    print(f"queue path, {n} concurrent (gateway+RabbitMQ)   {queued['tps']:8.0f} tokens/s   "
          f"{queued['tps'] / hf_tps:5.2f}x (goal >= 10x)")
    print(f"in-process batched worker, same batch          {local['tps']:8.0f} tokens/s   "
          f"queue/in-process {queued['tps'] / local['tps']:.2f}x (goal >= 0.9x)")
    added = p50(queued["latency"]) - p50(local["latency"])
    print(f"single-request p50: queue {p50(queued['latency']):.2f} ms, in-process batched "
          f"{p50(local['latency']):.2f} ms, added {added:.2f} ms (goal <= 1 ms)")
    achieved_bw = local["weight_bytes"] / local["step_1"]
    achieved_flops = 2 * local["params"] * 32 / local["step_32"]
    print(f"batch-1 decode: {local['step_1'] * 1000:.2f} ms/token, {achieved_bw / 1e9:.1f} GB/s of weights vs "
          f"{bandwidth / 1e9:.1f} GB/s copy bandwidth = {100 * achieved_bw / bandwidth:.0f}% (goal >= 70%)")
    print(f"batch-32 decode: {local['step_32'] * 1000:.2f} ms/step, {achieved_flops / 1e9:.0f} GFLOP/s vs "
          f"{peak / 1e9:.0f} GFLOP/s matmul peak = {100 * achieved_flops / peak:.0f}% (goal >= 50%)")
    print(f"response cache at the gateway: hit p50 {p50(queued['hits']):.2f} ms, miss p50 "
          f"{p50(queued['misses']):.2f} ms, {p50(queued['misses']) / p50(queued['hits']):.0f}x faster "
          "(goal p50 <= 1 ms, >= 50x)")


if __name__ == "__main__":
    main()
