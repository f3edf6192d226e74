"""Artifact cache speed: fetch MB/s from Redis on loopback, and fetch+load against a local load.

A GPT-2 124M-shaped model (random weights, about 500 MB of safetensors) is
published to a private redis-server, then fetched and verified several times.
The baseline is from_pretrained on the same directory on local disk, measured
in the same run.

    python bench/artifact_fetch.py [--repeats 3] [--layers 12]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime import artifacts
from kubelm_runtime.models import load_causal_lm
from kubelm_runtime.redis_store import RedisStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp_name, RedisServer(Path(tmp_name) / "redis") as redis:
        tmp = Path(tmp_name)
        source = tmp / "model"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).save_pretrained(source)
        store = RedisStore(redis.url, timeout=60)
        started = time.perf_counter()
        stored = artifacts.publish(store, source, "bench/gpt2")
        publish_s = time.perf_counter() - started
        mib = stored.size / 2**20

        fetch_s, fetch_load_s, local_load_s = [], [], []
        for i in range(args.repeats):
            dest = tmp / f"fetched-{i}"
            started = time.perf_counter()
            artifacts.fetch(store, "bench/gpt2", dest)
            fetch_s.append(time.perf_counter() - started)
            load_causal_lm(str(dest))
            fetch_load_s.append(time.perf_counter() - started)
            shutil.rmtree(dest)

            started = time.perf_counter()
            load_causal_lm(str(source))
            local_load_s.append(time.perf_counter() - started)

    fetch, fetch_load, local = (statistics.median(x) for x in (fetch_s, fetch_load_s, local_load_s))
    print(f"artifact: {mib:.0f} MiB in {len(stored.chunks)} chunks of {stored.chunk_bytes >> 20} MiB; "
          f"median of {args.repeats}")
    print(f"publish           {publish_s:6.2f} s   {mib / publish_s:7.0f} MiB/s")
    print(f"fetch + verify    {fetch:6.2f} s   {mib / fetch:7.0f} MiB/s")
    print(f"fetch + load      {fetch_load:6.2f} s")
    print(f"local load        {local:6.2f} s   (baseline)")
    print(f"ratio fetch+load / local load: {fetch_load / local:.2f}x")


if __name__ == "__main__":
    main()
