"""The main job: a local cluster trains a tiny model and serves it, through the operator.

1. start the dev cluster with its real node (containerd + kubelet running kubelm's images);
2. install kubelm as a user would: `manifests/install` (CRDs, RBAC, the operator as a Pod) and
   `manifests/dev` (Redis and RabbitMQ in the cluster);
3. apply a TrainingJob that fine-tunes a tiny GPT-2 on the sample corpus, showing its progress
   from the TrainingJob's status as it trains;
4. apply a LanguageModel serving what the TrainingJob published, send prompts through the gateway
   Service with the official `openai` client, and show the model's queue;
5. send a burst of requests: the autoscaler adds a worker, and removes it after the (shortened)
   scale-down window;
6. tear everything down, unless --keep.

    sudo .venv/bin/python scripts/demo.py [--steps 200] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import yaml

from kubelm_devcluster import cli as devcluster
from kubelm_devcluster import mainjob

NAMESPACE = "default"
MODEL = mainjob.MODEL
RUNTIME_CLI = str(Path(sys.executable).parent / "kubelm-runtime")
STARTED = time.monotonic()


def kubelm(kubeconfig: str, *args: str) -> str:
    """The `kubelm` command, as a user runs it."""
    result = subprocess.run([str(Path(sys.executable).parent / "kubelm"), *args], capture_output=True, text=True,
                            env={**os.environ, "KUBECONFIG": kubeconfig, "COLUMNS": "150"})
    if result.returncode:
        raise RuntimeError(f"kubelm {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def say(message: str) -> None:
    print(f"\n== {message}  [{time.monotonic() - STARTED:.0f}s]", flush=True)


def show(line: str) -> None:
    print(f"   {line}", flush=True)


class Cluster:
    def __init__(self, kubectl: str, kubeconfig: str):
        self.argv = [kubectl, f"--kubeconfig={kubeconfig}"]

    def kubectl(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run([*self.argv, *args], input=input, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", f"--field-manager={mainjob.FIELD_MANAGER}", "-f", "-",
                     input=yaml.safe_dump_all(objects))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", kind, "-n", NAMESPACE, name, "-o", "json")))


def wait(what: str, done: Callable[[], bool], timeout: float, interval: float = 1.0) -> float:
    """Waits for an event, saying what for; the seconds it took."""
    started = time.monotonic()
    show(f"waiting for {what} ...")
    while not done():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(interval)
    elapsed = time.monotonic() - started
    show(f"{what}: {elapsed:.1f}s")
    return elapsed


def train(cluster: Cluster, steps: int) -> dict[str, Any]:
    cluster.apply(mainjob.training_job(NAMESPACE, steps=steps))
    last = ""
    status: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal last, status
        status = cluster.get("trainingjob", MODEL).get("status", {})
        progress = status.get("progress") or {}
        line = f"{status.get('phase', 'Pending'):<10}"
        if progress:
            line += f" step {progress.get('step', 0)}/{progress.get('totalSteps', steps)}"
            line += f"  {progress.get('percent', 0):>5}%  loss {progress.get('loss', '-')}"
            line += f"  eval loss {progress.get('evalLoss', '-')}"
        if line != last:
            show(line)
            last = line
        return status.get("phase") in ("Succeeded", "Failed")

    wait("the TrainingJob to finish", finished, 1800)
    if status.get("phase") != "Succeeded":
        raise RuntimeError(f"training failed: {status.get('conditions')}")
    return status


def complete(client: openai.OpenAI, prompt: str, **params: Any) -> str:
    result = client.completions.create(model=MODEL, prompt=prompt, **params)
    return result.choices[0].text


def burst(cluster: Cluster, client: openai.OpenAI) -> None:
    """Keeps 32 requests in flight until the autoscaler has asked for a second worker."""
    stop = threading.Event()

    def send(i: int) -> None:
        while not stop.is_set():
            complete(client, f"story {i}", max_tokens=32, temperature=0.9)

    with ThreadPoolExecutor(max_workers=32) as pool:
        for i in range(32):
            pool.submit(send, i)
        try:
            wait("the autoscaler to add a worker",
                 lambda: cluster.get("languagemodel", MODEL)["status"].get("desiredReplicas", 1) > 1, 300)
        finally:
            stop.set()


def print_scaling(model: dict[str, Any], seen: int) -> int:
    history = model.get("status", {}).get("scalingHistory", [])
    for entry in history[seen:]:
        show(f"scaling: {entry.get('from')} -> {entry.get('to')}  ({entry.get('reason')})")
    return len(history)


def operator_rss_mib() -> float | None:
    """The operator container's resident memory, read from the host (the dev node is this machine)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"kubelm-operator" in Path(f"/proc/{pid}/cmdline").read_bytes():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200, about a minute)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster and everything in it running")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo's real node needs root (containerd, kubelet, iptables): run it with sudo", file=sys.stderr)
        return 2

    say("starting the dev cluster with a real node (the first run imports the images: minutes)")
    started = devcluster.up(devcluster.DEFAULT_DIR, timeout=1800, real_node=True)
    env = started.env()
    cluster = Cluster(str(started.layout.bin_dir / "kubectl"), env["KUBECONFIG"])
    node = cluster.kubectl("get", "nodes", "--no-headers").split()
    show(f"ready in {started.ready_seconds:.1f}s: node {node[0]} {node[1]}")
    try:
        say("installing kubelm: kubectl apply -k manifests/install and manifests/dev")
        mainjob.install(cluster.kubectl)
        show(cluster.kubectl("get", "pods", "-n", "kubelm-system").rstrip().replace("\n", "\n   "))
        data = mainjob.prepare_data(devcluster.DEFAULT_DIR / "demo-data", RUNTIME_CLI)
        cluster.apply(*mainjob.data_volume(data.resolve(), NAMESPACE))

        say(f"training: TrainingJob {MODEL}, a tiny GPT-2 on the sample corpus, {args.steps} steps on CPU")
        status = train(cluster, args.steps)
        show(f"published {status['artifact']['uri']} ({status['artifact']['digest'][:19]}...)")

        say(f"serving: LanguageModel {MODEL} with trainingJobRef {MODEL}")
        applied = time.monotonic()
        cluster.apply(mainjob.language_model(NAMESPACE, autoscaling={
            "minReplicas": 1, "maxReplicas": 2, "targetQueueLengthPerReplica": 4,
            "scaleDownStabilizationSeconds": 20}))
        cluster.kubectl("wait", "-n", NAMESPACE, f"languagemodel/{MODEL}", "--for=condition=Ready", "--timeout=600s")
        cluster.kubectl("rollout", "status", "-n", NAMESPACE, f"deployment/{MODEL}-gateway", "--timeout=300s")
        with mainjob.port_forward(cluster.argv, NAMESPACE, f"service/{MODEL}-gateway", 8080) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=300)
            first = complete(client, "Once upon a time", max_tokens=24, temperature=0)
            show(f"first answer {time.monotonic() - applied:.1f}s after the LanguageModel was applied")

            say("prompts through the gateway Service, with the official openai client")
            show(f"'Once upon a time' -> {first!r}")
            for prompt in ("The old fox", "Two plus three is"):
                show(f"{prompt!r} -> {complete(client, prompt, max_tokens=24, temperature=0)!r}")

            say("kubectl get lm,tj")
            show(cluster.kubectl("get", "lm,tj", "-n", NAMESPACE).rstrip().replace("\n", "\n   "))
            say("kubelm status")
            show(kubelm(env["KUBECONFIG"], "status", "-n", NAMESPACE).rstrip().replace("\n", "\n   "))
            queue = cluster.get("languagemodel", MODEL)["status"].get("queue", {})
            show(f"queue {queue.get('name')}: ready {queue.get('ready')}, unacked {queue.get('unacked')}, "
                 f"consumers {queue.get('consumers')}, dead-lettered {queue.get('deadLettered')}")

            say("a burst of requests: the autoscaler follows the queue")
            seen = print_scaling(cluster.get("languagemodel", MODEL), 0)
            burst(cluster, client)
            seen = print_scaling(cluster.get("languagemodel", MODEL), seen)
            wait("the scale-down window (20 s) and the worker removed",
                 lambda: cluster.get("languagemodel", MODEL)["status"].get("replicas") == 1
                 and cluster.get("languagemodel", MODEL)["status"].get("desiredReplicas") == 1, 600)
            print_scaling(cluster.get("languagemodel", MODEL), seen)
        rss = operator_rss_mib()
        if rss is not None:
            show(f"operator Pod resident memory: {rss:.0f} MiB")
    finally:
        if args.keep:
            say("left running; look around with:")
            show(f"eval \"$({Path(sys.executable).parent / 'kubelm-dev'} env)\"")
            show('"$KUBELM_DEV_BIN_DIR/kubectl" get lm,tj,pods -A')
            show(f"{Path(sys.executable).parent / 'kubelm'} status --watch   # or describe / explain lm/{MODEL}")
            show(f'"$KUBELM_DEV_BIN_DIR/kubectl" port-forward service/{MODEL}-gateway 8080')
            show(f"{Path(sys.executable).parent / 'kubelm-dev'} down   # when done")
        else:
            say("tearing down")
            devcluster.down(devcluster.DEFAULT_DIR)
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
