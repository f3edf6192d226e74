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
import asyncio
import http.client
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

from kubelm_contract import protocol, queues
from kubelm_contract.protocol import Decoding
from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.probes import http_get, wait_for
from kubelm_runtime.broker import RpcClient, new_request_id
from kubelm_runtime.serve.batching import Batcher
from kubelm_runtime.serve.engine import Batch, Engine, Item
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


class KeepAlive:
    """One persistent HTTP connection, as API clients keep (the latency figures exclude TCP set-up)."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def post(self, path: str, body: dict) -> dict:
        self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload
        return json.loads(payload)


def amqp_round_trips(amqp_url: str, queue: str, count: int) -> list[float]:
    """Single requests straight onto the model's queue, as the gateway sends them: the queue path alone."""
    client = RpcClient(amqp_url)
    client.start()

    async def one(i: int) -> float:
        request_id = new_request_id()
        body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": [f"amqp {i}"],
                           "params": {"max_new_tokens": 1, "temperature": 0}, "deadline": time.time() + 60,
                           "model": "bench"}).encode()
        started = time.perf_counter()
        raw = await client.call(queue, body, request_id, 60, {queues.SENT_AT_HEADER: int(time.time() * 1000),
                                                              queues.CACHE_CHECKED_HEADER: 1})
        elapsed = time.perf_counter() - started
        assert json.loads(raw)["id"] == request_id
        return elapsed

    async def run() -> list[float]:
        return [await one(i) for i in range(count)]

    try:
        return asyncio.run(run())
    finally:
        client.close()


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
    # Steady decode steps for the rooflines (prefill excluded), every row kept to its full length.
    step_1, step_32 = decode_step(engine, 1), decode_step(engine, 32)
    return {"tps": tps, "latency": latency, "step_1": step_1, "step_32": step_32,
            "weight_bytes": engine.weight_bytes, "params": engine.parameter_count, "dtype": engine.dtype}


def decode_step(engine: Engine, rows: int, steps: int = 48) -> float:
    """Seconds per decode step of `rows` rows (16-token prompts), prefill and warm-up excluded."""
    eos, engine.eos = engine.eos, -1  # a random model may pick EOS: keep every row decoding
    try:
        batch = Batch()
        engine.join(batch, [(i, Item(" ".join(["fox"] * 16), Decoding(max_new_tokens=steps + 8, temperature=0.7)))
                            for i in range(rows)])
        for _ in range(8):
            engine.step(batch)
        started = time.perf_counter()
        for _ in range(steps):
            engine.step(batch)
        return (time.perf_counter() - started) / steps
    finally:
        engine.eos = eos


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

        client = KeepAlive(gateway_port)

        def timed(body: dict) -> float:
            started = time.perf_counter()
            reply = client.post("/v1/completions", {"model": "bench", **body})
            elapsed = time.perf_counter() - started
            timed.last = reply  # type: ignore[attr-defined]
            return elapsed

        concurrent("warm")
        tps = tokens_per_second(lambda: concurrent("q"))[0]
        latency = [timed({"prompt": f"latency {i}", "max_tokens": 1, "temperature": 0}) for i in range(30)]
        amqp = amqp_round_trips(connection["KUBELM_AMQP_URL"], "kubelm.default.bench.requests", 30)
        misses = [timed({"prompt": f"cache {i}", "max_tokens": tokens, "temperature": 0}) for i in range(20)]
        hits = [timed({"prompt": "cache 0", "max_tokens": tokens, "temperature": 0}) for _ in range(50)]
        assert timed.last["kubelm"]["cached"]  # type: ignore[attr-defined]
        return {"tps": tps, "latency": latency, "amqp": amqp, "misses": misses, "hits": hits}
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
    added = p50(queued["amqp"]) - p50(local["latency"])
    print(f"single-request p50: in-process batched {p50(local['latency']):.2f} ms; RabbitMQ queue path "
          f"{p50(queued['amqp']):.2f} ms, added {added:.2f} ms (goal <= 1 ms); through the HTTP gateway "
          f"{p50(queued['latency']):.2f} ms, {p50(queued['latency']) - p50(queued['amqp']):.2f} ms more")
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
