"""Serving speed, measured against baselines from the same run.

Model: GPT-2 124M shapes (12 layers, 768 wide, 12 heads) with the tiny corpus's
2048-token vocabulary, random weights, built from config. Every figure counts
generated tokens, since a random model may stop early at EOS.

1. Throughput, 32 concurrent requests through gateway + RabbitMQ + worker
   (precision auto), against transformers' generate one request at a time (fp32,
   the library's default) and against the worker's engine in-process on the
   same batch (queue overhead): 5 queue runs, each followed by an in-process
   run; the median of the 5 paired ratios, and best against best.
2. Added latency of the queue path: for single one-token requests sent to the
   queue as the gateway sends them, the round trip minus the worker's own time
   (delivery to reply, reported in the reply), p50; beside it the round trip of a
   worker that answers at once (the broker's floor), and single-request latency
   in-process, through RabbitMQ and through the HTTP gateway.
3. Roofline: steady decode steps at batch 1 and 32 against the time the
   machine needs at least, max(bytes read / memory bandwidth, FLOPs / matmul
   peak), counting the weights and the KV cache read per step and the products
   and attention's arithmetic; bandwidth is the better of a copy and a read-only
   sum on the engine's threads, the peak a 2048-square product in the serving
   precision. Each run of steps is paired with probes next to it, and the
   median of the paired fractions is the figure. The CPU's name and the path
   oneDNN takes for the serving precision's packed products are printed.
4. Response cache: p50 of a cache hit at the gateway against a miss, over one
   kept-alive HTTP connection as API clients use.

    python bench/serve_throughput.py [--requests 32] [--tokens 32] [--max-wait-ms 20] [--max-prefill-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubelm_contract import protocol, queues
from kubelm_contract.protocol import Decoding
from kubelm_contract.queues import QueueSpec
from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.probes import http_get, wait_for
from kubelm_runtime import allocator
from kubelm_runtime.broker import Delivery, RpcClient, WorkerChannel, new_request_id
from kubelm_runtime.cpu import cpu_model
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


class KeepAlive:
    """One persistent HTTP connection, as API clients keep (the latency figures exclude TCP set-up)."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def post(self, path: str, body: dict) -> dict:
        try:
            self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = self.connection.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):  # the server closed an idle connection
            self.connection.close()
            self.connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = self.connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload
        return json.loads(payload)

    def stream(self, path: str, body: dict) -> tuple[float, int]:
        """A streamed completion read to its end: (seconds to the first text, completion tokens)."""
        started = time.perf_counter()
        self.connection.request("POST", path, json.dumps({**body, "stream": True,
                                                          "stream_options": {"include_usage": True}}),
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        assert response.status == 200, response.read()
        first, tokens = None, 0
        for line in response:  # Server-Sent Events, one `data:` line each
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return first if first is not None else time.perf_counter() - started, tokens


def amqp_round_trips(amqp_url: str, queue: str, count: int) -> list[tuple[float, float]]:
    """Single requests straight onto a model's queue, as the gateway sends them: (round trip, the
    worker's own time from delivery to reply) per request, in seconds."""
    client = RpcClient(amqp_url)
    client.start()

    async def one(i: int) -> tuple[float, float]:
        request_id = new_request_id()
        body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": [f"amqp {i}"],
                           "params": {"max_new_tokens": 1, "temperature": 0}, "deadline": time.time() + 60,
                           "model": "bench"}).encode()
        started = time.perf_counter()
        raw = await client.call(queue, body, request_id, 60, {queues.SENT_AT_HEADER: int(time.time() * 1000),
                                                              queues.CACHE_CHECKED_HEADER: 1})
        elapsed = time.perf_counter() - started
        reply = json.loads(raw)
        timings = reply.get("timings") or {}
        return elapsed, (timings.get("batch_wait_ms", 0) + timings.get("generate_ms", 0)) / 1000

    async def run() -> list[tuple[float, float]]:
        return [await one(i) for i in range(count)]

    try:
        return asyncio.run(run())
    finally:
        client.close()


def echo_worker(amqp_url: str, ready: Any) -> None:
    """A worker that answers at once, on the runtime's own broker module: the floor of the queue path."""
    channel = WorkerChannel(amqp_url, prefetch=64)
    queue = channel.declare("default", "echo", QueueSpec())

    def answer(delivery: Delivery) -> None:
        request = json.loads(delivery.body)
        channel.reply(delivery.reply_to or "", delivery.correlation_id, json.dumps({"id": request["id"]}).encode())
        channel.ack(delivery.tag)

    channel.consume(queue, answer)
    ready.set()
    while True:
        channel.wait(1)


def histogram_totals(metrics_url: str, name: str = "time_to_first_token_seconds") -> tuple[float, float]:
    """(sum, count) of a histogram a worker or gateway exports whose name ends with `name` (all labels)."""
    _, body = http_get(metrics_url)
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        if family.name.endswith(name):
            for sample in family.samples:
                part = sample.name.rsplit("_", 1)[1]
                if part in totals:
                    totals[part] += sample.value
    return totals["sum"], totals["count"]


def mean_since(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Milliseconds, the mean of the observations between two readings."""
    count = after[1] - before[1]
    return 1000 * (after[0] - before[0]) / count if count else float("nan")


def tokens_per_second(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def fastest(run: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of a few runs: what a probe of the machine reports."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def memory_bandwidth() -> Callable[[], float]:
    """A probe: bytes per second the engine's threads move to and from memory, the better of a copy
    (read + write, as STREAM counts it) and a read-only sum over 512 MiB; best of 3 each."""
    source = torch.ones(256 * 2**20 // 2, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    whole = torch.ones(512 * 2**20 // 4)

    def probe() -> float:
        copy = 2 * source.nbytes / fastest(lambda: target.copy_(source))
        read = whole.nbytes / fastest(whole.sum)
        return max(copy, read)

    return probe


def machine(dtype: torch.dtype) -> Callable[[], tuple[float, float]]:
    """Probes: (memory bandwidth in bytes/s, matrix-product peak in FLOP/s in `dtype`)."""
    bandwidth, peak = memory_bandwidth(), matmul_peak(dtype)
    return lambda: (bandwidth(), peak())


ONEDNN_PROBE = """
import sys, torch
dtype = getattr(torch, sys.argv[1])
weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(768, 768, dtype=dtype), 32)
torch.ops.mkldnn._linear_pointwise(torch.randn(32, 768, dtype=dtype), weight, None, "none", [], "")
"""


def onednn_path(dtype: torch.dtype) -> str:
    """Which implementation oneDNN runs for a packed product in `dtype` (e.g. brg_matmul:avx512_core_amx
    for bf16 on AMX, brg_matmul:avx512_core_bf16 on AVX512-BF16), from its verbose log; or why none."""
    found = subprocess.run([sys.executable, "-c", ONEDNN_PROBE, str(dtype).removeprefix("torch.")],
                           env={**os.environ, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True, timeout=120)
    for line in found.stdout.splitlines():
        fields = line.split(",")
        if "exec" in fields and "inner_product" in fields:
            return fields[fields.index("inner_product") + 1]
    reason = (found.stderr.strip().splitlines() or ["no oneDNN product ran"])[-1]
    return f"none ({reason[-160:]})"


def matmul_peak(dtype: torch.dtype) -> Callable[[], float]:
    """A probe: FLOP/s of a square 2048 matrix product, best of 3."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    return lambda: 2 * 2048**3 / fastest(lambda: a @ b)


def hf_sequential(model_dir: Path, n: int, tokens: int) -> float:
    """transformers' generate, one request at a time, fp32 (the library's default)."""
    baseline = Engine.load(str(model_dir), dtype="fp32", batch_hint=0, lean=False)  # transformers as it comes

    def run() -> int:
        count = 0
        for prompt in prompts(n, "hf"):
            ids = baseline.tokenizer(prompt, return_tensors="pt")
            out = baseline.model.generate(**ids, max_new_tokens=tokens, do_sample=True, temperature=0.7, top_k=50,
                                          pad_token_id=baseline.tokenizer.eos_token_id)
            count += out.shape[1] - ids["input_ids"].shape[1]
        return count

    return tokens_per_second(run)


def in_process(model_dir: Path, n: int, tokens: int, max_wait: float) -> dict:
    """The worker's engine and batcher without the queue: the reference for the queue's overhead."""
    engine = Engine.load(str(model_dir), dtype="auto")
    gc.collect()
    gc.freeze()  # as the worker does after loading
    sampled = Decoding(max_new_tokens=tokens, temperature=0.7, top_k=50)
    engine.generate([Item(p, sampled) for p in prompts(n, "warm")])

    def run(i: int) -> int:
        return sum(o.completion_tokens for o in engine.generate([Item(p, sampled) for p in prompts(n, f"ip{i}")]))

    latency = []
    for i in range(30):
        batcher: Batcher[Item] = Batcher(n, max_wait)
        started = time.perf_counter()
        batcher.add(Item(f"latency {i}", Decoding(max_new_tokens=1, temperature=0)), time.monotonic())
        time.sleep(batcher.time_left(time.monotonic()) or 0)
        engine.generate(batcher.take(time.monotonic()))
        latency.append(time.perf_counter() - started)
    # Steady decode steps for the rooflines (prefill excluded), every row kept to its full length.
    probe = machine(engine.dtype)
    return {"run": run, "latency": latency, "steps_1": decode_steps(engine, 1, probe),
            "steps_32": decode_steps(engine, 32, probe), "packed": engine.packed_layers,
            "weight_bytes": engine.weight_bytes, "params": engine.parameter_count, "dtype": engine.dtype}


@dataclass(frozen=True)
class StepRun:
    seconds: float
    """Per decode step."""
    rows: int
    columns: int
    """KV cache columns (positions) each step attended to, on average."""
    bandwidth: float
    peak: float
    """What the probes next to this run measured: bytes/s and FLOP/s."""


def decode_steps(engine: Engine, rows: int, probe: Callable[[], tuple[float, float]], chunks: int = 7,
                 steps: int = 8) -> list[StepRun]:
    """Runs of `steps` decode steps of `rows` rows (16-token prompts, prefill and warm-up excluded),
    alternating with the machine's probes so that each run is compared with what the machine could do
    in the same minute of a shared host; two untimed steps after each probe let the caches refill."""
    ends, engine.end_tokens = engine.end_tokens, frozenset()  # a random model may pick EOS: keep every row decoding
    try:
        batch = Batch()
        budget = (chunks + 1) * (steps + 2) + 1
        engine.join(batch, [(i, Item(" ".join(["fox"] * 16), Decoding(max_new_tokens=budget, temperature=0.7)))
                            for i in range(rows)])
        for _ in range(steps):
            engine.step(batch)
        runs = []
        for _ in range(chunks):
            bandwidth, peak = probe()
            for _ in range(2):  # the probe evicted the caches: settle before timing
                engine.step(batch)
            assert batch.attention is not None
            columns = batch.attention.shape[1] + steps // 2
            started = time.perf_counter()
            for _ in range(steps):
                engine.step(batch)
            runs.append(StepRun((time.perf_counter() - started) / steps, rows, columns, bandwidth, peak))
        return runs
    finally:
        engine.end_tokens = ends


@dataclass(frozen=True)
class Roofline:
    """The least time a decode step can take on this machine, and why."""

    memory_seconds: float
    compute_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"


def roofline(run: StepRun, weight_bytes: int, params: int, dtype: torch.dtype) -> Roofline:
    """Bytes: every weight once, and each row's keys and values in every layer. FLOPs: two per parameter
    per row for the products, and attention's two products over the cache."""
    element = torch.empty((), dtype=dtype).element_size()
    cache_bytes = 2 * SHAPE.n_layer * run.rows * run.columns * SHAPE.n_embd * element
    attention_flops = 2 * 2 * SHAPE.n_layer * run.rows * run.columns * SHAPE.n_embd
    return Roofline((weight_bytes + cache_bytes) / run.bandwidth,
                    (2 * params * run.rows + attention_flops) / run.peak)


def summary(runs: list[StepRun], weight_bytes: int, params: int, dtype: torch.dtype) -> tuple[float, str]:
    """(median fraction of the roofline, a line saying it): each run against the roofline of its own
    probes, because identical steps vary by up to 1.6x between minutes here, and the probes as much."""
    shares = sorted(roofline(r, weight_bytes, params, dtype).seconds / r.seconds for r in runs)
    fastest = min(runs, key=lambda r: r.seconds)
    best = roofline(fastest, weight_bytes, params, dtype)
    median = statistics.median(shares)
    return median, (
        f"{100 * median:.0f}% of the roofline, median of {len(shares)} paired runs ({100 * shares[0]:.0f}-"
        f"{100 * shares[-1]:.0f}%); fastest step {fastest.seconds * 1000:.2f} ms against {best.seconds * 1000:.2f} ms "
        f"({best.bound}-bound: {best.memory_seconds * 1000:.2f} ms of bytes at "
        f"{statistics.median(r.bandwidth for r in runs) / 1e9:.1f} GB/s, {best.compute_seconds * 1000:.2f} ms of "
        f"FLOPs at {statistics.median(r.peak for r in runs) / 1e9:.0f} GFLOP/s; {fastest.columns} cache columns)")


def queue_path(model_dir: Path, n: int, tokens: int, max_wait: float, tmp: Path,
               in_process_run: Callable[[int], int], max_prefill_tokens: int = 0) -> dict:
    """A dev cluster's RabbitMQ and Redis, a worker and a gateway as processes, driven over HTTP. Each
    throughput run is paired with a run of the in-process engine right after it (same load)."""
    cluster = devcluster.up(tmp / "cluster")
    processes = []
    try:
        connection = {**os.environ, **cluster.env()}
        gateway_port, health_port = free_port(), free_port()
        configs = {
            "serve": {"name": "bench", "model": {"uri": str(model_dir)}, "cacheDir": str(tmp / "cache"),
                      "healthPort": health_port, "limits": {"maxNewTokens": 256},
                      "batching": {"maxBatchSize": n, "maxWaitMillis": int(max_wait * 1000),
                                   **({"maxPrefillTokens": max_prefill_tokens} if max_prefill_tokens else {})}},
            "gateway": {"port": gateway_port, "host": "127.0.0.1", "requestTimeoutSeconds": 600,
                        "accessLog": False},
        }
        for kind, config in configs.items():
            (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(config))
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "kubelm_runtime", kind, "--config", str(tmp / f"{kind}.yaml")],
                env=connection, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("worker", lambda: http_get(f"http://127.0.0.1:{health_port}/readyz")[0] == 200, 300)
        wait_for("gateway", lambda: http_get(f"http://127.0.0.1:{gateway_port}/readyz")[0] == 200, 60)
        endpoints = {"worker": f"http://127.0.0.1:{health_port}/metrics",
                     "gateway": f"http://127.0.0.1:{gateway_port}/metrics"}

        joined: list[int] = []
        pool = ThreadPoolExecutor(max_workers=n)
        local = threading.local()

        def send(prompt: str) -> dict:
            # One kept-alive connection per client thread, as API clients pool them.
            if not hasattr(local, "client"):
                local.client = KeepAlive(gateway_port)
            return local.client.post("/v1/completions", {
                "model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0.7, "top_k": 50})

        def concurrent(tag: str) -> int:
            replies = list(pool.map(send, prompts(n, tag)))
            joined[:] = [r["kubelm"]["timings"]["batch_size"] for r in replies]
            return sum(r["usage"]["completion_tokens"] for r in replies)

        client = KeepAlive(gateway_port)

        def timed(body: dict) -> float:
            started = time.perf_counter()
            reply = client.post("/v1/completions", {"model": "bench", **body})
            elapsed = time.perf_counter() - started
            timed.last = reply  # type: ignore[attr-defined]
            return elapsed

        first_tokens: list[float] = []

        def streamed(prompt: str) -> int:
            if not hasattr(local, "client"):
                local.client = KeepAlive(gateway_port)
            first, produced = local.client.stream("/v1/completions", {
                "model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0.7, "top_k": 50})
            first_tokens.append(first)
            return int(produced)

        def concurrent_streams(tag: str) -> int:
            return sum(pool.map(streamed, prompts(n, tag)))

        concurrent("warm")
        pairs = [(tokens_per_second(functools.partial(concurrent, f"q{i}")),
                  tokens_per_second(functools.partial(in_process_run, i))) for i in range(5)]
        # Streaming against not streaming, paired, the same requests through the same gateway.
        before = {where: histogram_totals(url) for where, url in endpoints.items()}
        waited = histogram_totals(endpoints["worker"], "queue_wait_seconds")
        streaming = [(tokens_per_second(functools.partial(concurrent_streams, f"s{i}")),
                      tokens_per_second(functools.partial(concurrent, f"n{i}"))) for i in range(3)]
        # The same first tokens as the worker and the gateway saw them: where the client's wait goes.
        first_token_means = {where: mean_since(before[where], histogram_totals(url))
                             for where, url in endpoints.items()}
        # From the gateway's publish to the worker taking the request up (the two share one clock).
        first_token_means["queue"] = mean_since(waited, histogram_totals(endpoints["worker"], "queue_wait_seconds"))
        latency = [timed({"prompt": f"latency {i}", "max_tokens": 1, "temperature": 0}) for i in range(30)]
        amqp = amqp_round_trips(connection["KUBELM_AMQP_URL"], "kubelm.default.bench.requests", 50)
        ready = multiprocessing.Event()
        echo = multiprocessing.Process(target=echo_worker, args=(connection["KUBELM_AMQP_URL"], ready), daemon=True)
        echo.start()
        ready.wait(30)
        floor = amqp_round_trips(connection["KUBELM_AMQP_URL"], "kubelm.default.echo.requests", 200)
        echo.terminate()
        misses = [timed({"prompt": f"cache {i}", "max_tokens": tokens, "temperature": 0}) for i in range(20)]
        hits = [timed({"prompt": "cache 0", "max_tokens": tokens, "temperature": 0}) for _ in range(50)]
        assert timed.last["kubelm"]["cached"]  # type: ignore[attr-defined]
        pool.shutdown()
        return {"pairs": pairs, "streaming": streaming, "first_tokens": first_tokens,
                "first_token_means": first_token_means,
                "latency": latency, "amqp": amqp, "floor": floor, "misses": misses, "hits": hits,
                "joined": sorted(set(joined))}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        devcluster.down(tmp / "cluster")


def main() -> None:
    allocator.reexec_with_jemalloc()  # the worker runs on it: so do its baselines
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--max-prefill-tokens", type=int, default=0, help="the worker's batching.maxPrefillTokens")
    args = parser.parse_args()
    n, tokens, max_wait = args.requests, args.tokens, args.max_wait_ms / 1000

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build(tmp / "model", [REPO / "examples/tiny-corpus/train.txt"], SHAPE)
        hf_tps = hf_sequential(model_dir, n, tokens)
        local = in_process(model_dir, n, tokens, max_wait)
        queued = queue_path(model_dir, n, tokens, max_wait, tmp, local["run"], args.max_prefill_tokens)

    dtype, weights, params = local["dtype"], local["weight_bytes"], local["params"]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.backends.cpu.get_cpu_capability()} kernels; "
          f"oneDNN packed product: bf16 {onednn_path(torch.bfloat16)}, fp32 {onednn_path(torch.float32)}")
    print(f"model: GPT-2 124M shapes, vocabulary 2048, {params / 1e6:.0f}M parameters; serving {dtype} "
          f"({local['packed']} products packed for oneDNN); {n} requests x {tokens} new tokens; batching wait "
          f"{args.max_wait_ms} ms; prefill budget {args.max_prefill_tokens or 'none'}; "
          f"{torch.get_num_threads()} threads; {allocator.in_use()} malloc")
    print(f"transformers generate, one at a time (fp32)    {hf_tps:8.0f} tokens/s   1.00x")
    queue_tps, local_tps = (max(q for q, _ in queued["pairs"]), max(i for _, i in queued["pairs"]))
    ratios = sorted(q / i for q, i in queued["pairs"])
    ceiling = n / min(roofline(r, weights, params, dtype).seconds for r in local["steps_32"]) / hf_tps
    print(f"queue path, {n} concurrent (gateway+RabbitMQ)   {queue_tps:8.0f} tokens/s   "
          f"{queue_tps / hf_tps:5.2f}x (goal >= 40x with the step at >= 60% of its roofline; a step at the "
          f"roofline itself would give {ceiling:.0f}x here)")
    print(f"in-process batched worker, same batch          {local_tps:8.0f} tokens/s   queue/in-process: "
          f"{statistics.median(ratios):.2f}x median of {len(ratios)} paired runs "
          f"({ratios[0]:.2f}-{ratios[-1]:.2f}x), {queue_tps / local_tps:.2f}x best/best (goal >= 0.9x)")
    streamed = sorted(s / q for s, q in queued["streaming"])
    print(f"streaming, {n} concurrent: {max(s for s, _ in queued['streaming']):.0f} tokens/s, streamed/not "
          f"{statistics.median(streamed):.2f}x median of {len(streamed)} paired runs ({streamed[0]:.2f}-"
          f"{streamed[-1]:.2f}x) (goal >= 0.9x)")
    print(f"  the {n} queued requests joined the running batch in {len(queued['joined'])} groups "
          f"(rows after each join: {queued['joined']})")
    added = p50([rtt - own for rtt, own in queued["amqp"]])
    floor = p50([rtt for rtt, _ in queued["floor"]])
    print(f"single request through RabbitMQ ({QueueSpec().type} queue): p50 added to the worker's own time "
          f"{added:.2f} ms = {added / floor:.2f}x the round trip of a worker that answers at once, {floor:.2f} ms "
          "(goal <= 2x)")
    step_32 = min(r.seconds for r in local["steps_32"]) * 1000
    first = p50(queued["first_tokens"])
    means = queued["first_token_means"]
    print(f"time to first text, {n} concurrent streamed, p50 {first:.0f} ms = {first / step_32:.1f} batch-{n} "
          f"decode steps ({step_32:.1f} ms fastest); goal: 2 steps + the broker's round trip = "
          f"{2 * step_32 + floor:.0f} ms; means: at the gateway (request to first text) {means['gateway']:.0f} ms, "
          f"of which waiting in the queue (publish to the worker taking it up) {means['queue']:.0f} ms and at the "
          f"worker (taken up to first token) {means['worker']:.0f} ms")
    print(f"single request, 1 new token: in-process batched {p50(local['latency']):.2f} ms, RabbitMQ "
          f"{p50([rtt for rtt, _ in queued['amqp']]):.2f} ms, HTTP gateway + RabbitMQ {p50(queued['latency']):.2f} ms")
    for rows in (1, 32):
        print(f"batch-{rows} decode: {summary(local[f'steps_{rows}'], weights, params, dtype)[1]} (goal >= 60%)")
    print(f"response cache at the gateway: hit p50 {p50(queued['hits']):.2f} ms, miss p50 "
          f"{p50(queued['misses']):.2f} ms, {p50(queued['misses']) / p50(queued['hits']):.0f}x faster "
          "(goal p50 <= 1 ms, >= 50x)")


if __name__ == "__main__":
    main()
