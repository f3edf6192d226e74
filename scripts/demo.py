"""The main job: a local cluster trains a tiny model and serves it.

1. start the dev cluster (control plane, Redis, RabbitMQ) and install the CRDs;
2. create a TrainingJob for the tiny corpus (the operator that will run it as pods
   is on the roadmap; here its runtime runs as a local process, exactly as the pod would);
3. train a tiny GPT-2 built from config with `kubelm-runtime train`, with progress in
   Redis and the model published to the artifact cache;
4. serve the artifact: `kubelm-runtime serve` fetches and verifies it from Redis and
   consumes the model's RabbitMQ queue; `kubelm-runtime gateway` answers OpenAI-style
   completions over HTTP (again as local processes until the operator runs them as pods).

    python scripts/demo.py [--steps 300] [--keep-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from kubelm_contract import env, keys
from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.probes import http_get, wait_for
from kubelm_runtime.redis_store import RedisStore

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "tiny-corpus"


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(tmp: Path, connection: dict[str, str]) -> dict:
    """Starts `kubelm-runtime serve` on the published artifact and `kubelm-runtime gateway`, as pods would."""
    health, port = free_port(), free_port()
    configs = {
        "serve": {"name": "tiny-story", "model": {"artifact": "artifact://default/tiny-story"},
                  "cacheDir": str(tmp / "cache"), "healthPort": health,
                  "batching": {"maxBatchSize": 16, "maxWaitMillis": 10}},
        "gateway": {"host": "127.0.0.1", "port": port},
    }
    processes = []
    for kind, config in configs.items():
        (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(config))
        processes.append(subprocess.Popen([sys.executable, "-m", "kubelm_runtime", kind, "--config",
                                           str(tmp / f"{kind}.yaml")], env={**os.environ, **connection}))
    wait_for("worker", lambda: http_get(f"http://127.0.0.1:{health}/readyz")[0] == 200, 120)
    wait_for("gateway", lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60)
    return {"url": f"http://127.0.0.1:{port}", "processes": processes}


def complete(served: dict, body: dict) -> dict:
    request = urllib.request.Request(f"{served['url']}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--keep-cluster", action="store_true", help="leave the dev cluster running afterwards")
    args = parser.parse_args()

    say("starting the dev cluster")
    cluster = devcluster.up(devcluster.DEFAULT_DIR)
    connection = cluster.env()
    kubectl = [str(cluster.layout.bin_dir / "kubectl"), f"--kubeconfig={connection[env.KUBECONFIG]}"]
    print(f"ready in {cluster.ready_seconds:.1f}s; KUBECONFIG={connection[env.KUBECONFIG]}")
    try:
        subprocess.run([*kubectl, "apply", "--server-side", "-k", str(REPO / "crds")], check=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/trainingjobs.kubelm.io"], check=True)

        with tempfile.TemporaryDirectory(prefix="kubelm-demo-") as tmp_name:
            tmp = Path(tmp_name)
            say("building a tiny GPT-2 and tokenizer from the local corpus")
            base = tmp / "base-model"
            subprocess.run([sys.executable, "-m", "kubelm_runtime", "tiny-model", "--corpus",
                            str(CORPUS / "train.txt"), "--out", str(base)], check=True, stdout=subprocess.DEVNULL)

            job = {
                "apiVersion": "kubelm.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "tiny-story"},
                "spec": {"baseModel": {"uri": str(base)},
                         "dataset": {"train": str(CORPUS / "train.txt"), "validation": str(CORPUS / "valid.txt"),
                                     "test": str(CORPUS / "test.txt")},
                         "hyperparameters": {"maxSteps": args.steps, "batchSize": 16, "maxLength": 64,
                                             "learningRate": 0.003, "warmupSteps": 20, "evalIntervalSteps": 100},
                         "checkpointing": {"intervalSteps": 100}}}
            subprocess.run([*kubectl, "apply", "--server-side", "-f", "-"], input=yaml.safe_dump(job), text=True,
                           check=True)
            say("TrainingJob as the apiserver stored it (defaults applied)")
            subprocess.run([*kubectl, "get", "tj", "tiny-story", "-o", "jsonpath={.spec}"], check=True)
            print()

            config = {"jobId": "default/tiny-story", "outputDir": str(tmp / "out"), "logIntervalSteps": 50,
                      **{k: v for k, v in job["spec"].items()}}  # type: ignore[dict-item]
            (tmp / "train.yaml").write_text(yaml.safe_dump(config))
            say(f"training {args.steps} steps with kubelm-runtime train")
            subprocess.run([sys.executable, "-m", "kubelm_runtime", "train", "--config", str(tmp / "train.yaml")],
                           check=True, env={**os.environ, **connection})

            store = RedisStore(connection[env.REDIS_URL])
            progress = store.get_json(keys.progress("default/tiny-story"))
            say("progress the operator will mirror into TrainingJob status")
            print(json.dumps(progress, indent=2))

            say("serving the artifact: a worker on the RabbitMQ queue and the OpenAI-compatible gateway")
            served = serve(tmp, connection)
            try:
                for prompt in ("two plus three is", "the old fox"):
                    reply = complete(served, {"model": "tiny-story", "prompt": prompt, "max_tokens": 16,
                                              "temperature": 0})
                    print(f"{prompt!r} -> {reply['choices'][0]['text']!r}  "
                          f"(cached: {reply['kubelm']['cached']})")
                again = complete(served, {"model": "tiny-story", "prompt": "two plus three is", "max_tokens": 16,
                                          "temperature": 0})
                print(f"the same request again is answered from the response cache: {again['kubelm']['cached']}")
            finally:
                for process in served["processes"]:
                    process.send_signal(signal.SIGTERM)
                    process.wait(60)
    finally:
        if not args.keep_cluster:
            say("stopping the dev cluster")
            devcluster.down(devcluster.DEFAULT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
