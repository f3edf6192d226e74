"""Operator throughput and the autoscaler's reaction time.

The operator runs as a local process on the dev cluster with the shipped RBAC.

- 200 TrainingJobs created at once (suspended): time until every one has its Job,
  ConfigMap and Secret and its status;
- 200 LanguageModels created at once (no gateway, scaled to zero): time until every one
  has its queues declared, its registry entry, its Deployment and its status;
- one LanguageModel at zero workers: time from a backlog appearing in its queue to the
  Deployment's replicas being raised, and from the queue emptying to zero again after
  a 5 s scale-down window;
- steady state (`--steady 500 --busy 50`): 500 LanguageModels on the builtin autoscaler, requests
  published to and consumed from 50 of their queues for `--window` seconds (below the activation
  length, so no worker starts): status writes per model per minute, the API server's writes per
  second against its own create rate, the operator's CPU and RSS.

Baseline, measured in the same run with the same client and concurrency: the API
server's own rate for creating 200 ConfigMaps. Printed: rates, their ratio, the
operator's CPU and RSS.

    python bench/operator_scale.py [--count 200] [--clients 8] [--steady 500 --busy 50 --window 60]
                                   [--only-steady]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.operator import OperatorProcess, install, service_account_kubeconfig
from kubelm_devcluster.probes import wait_for

SPEC = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
        "resources": {"cpu": "10m", "memory": "32Mi"}, "suspend": True}
LM_SPEC = {"model": {"hub": {"id": "openai-community/gpt2"}}, "gateway": {"enabled": False},
           "autoscaling": {"engine": "none", "minReplicas": 0}}
REACTIVE = {"model": {"hub": {"id": "openai-community/gpt2"}}, "gateway": {"enabled": False},
            "resources": {"cpu": "10m", "memory": "32Mi"},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "targetQueueLengthPerReplica": 4,
                            "scaleDownStabilizationSeconds": 5}}


def _count(response: Any) -> int:
    """Items in a raw list response: the client's model classes would cost the machine more CPU than the
    operator under test spends (it shares the 2 cores)."""
    return len(json.loads(response.data)["items"])


def _timed(count: int, clients: int, create: Callable[[int], Any]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(create, range(count)))
    return time.perf_counter() - started


WRITES = ("POST", "PUT", "PATCH", "APPLY", "DELETE")


def _counter(text: str, name: str) -> Iterator[tuple[dict[str, str], int]]:
    """(labels, value) of each sample of counter `name` in Prometheus text. A regex for the one metric:
    the API server's whole exposition is megabytes, parsed every second while it is measured."""
    for sample in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M):
        yield dict(re.findall(r'(\w+)="([^"]*)"', sample[1])), int(float(sample[2]))


def _writes(kubectl: Callable[..., str]) -> Counter[str]:
    """The API server's count of write requests so far, by verb and resource (its own /metrics)."""
    counts: Counter[str] = Counter()
    for labels, value in _counter(kubectl("get", "--raw", "/metrics"), "apiserver_request_total"):
        if labels.get("verb") in WRITES:
            resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[f"{labels['verb']} {resource}"] += value
    return counts


def _settle(kubectl: Callable[..., str]) -> None:
    """Waits until the API server takes (almost) no writes: the controllers are done with the last phase,
    whose after-work (the Job controller's status updates and Events) would be counted against the next."""
    last, quiet_for = [_writes(kubectl)], [0]

    def quiet() -> bool:
        now = _writes(kubectl)
        delta, last[0] = sum((now - last[0]).values()), now
        # Three quiet seconds in a row: a controller working through a rate-limited queue pauses for one.
        quiet_for[0] = quiet_for[0] + 1 if delta <= 3 else 0
        return quiet_for[0] >= 3
    wait_for("the API server quiet", quiet, timeout=180, interval=1.0)


def _reconciles(operator: OperatorProcess, kind: str) -> Counter[str]:
    """The operator's reconciliations of `kind` so far, by trigger (its own metrics)."""
    counts: Counter[str] = Counter()
    for labels, value in _counter(operator.metrics_text(), "kubelm_operator_reconciles_total"):
        if labels.get("kind") == kind:
            counts[labels["trigger"]] += value
    return counts


def _per_object(before: Counter[str], after: Counter[str], count: int) -> str:
    delta = after - before
    parts = [f"{n / count:.1f} {key}" for key, n in delta.most_common() if n / count >= 0.05]
    return f"{sum(delta.values()) / count:.1f} per object: " + ", ".join(parts)


def _converge(operator: OperatorProcess, custom: Any, namespace: str, kind: str, spec: dict[str, Any], phase: str,
              count: int, clients: int, children: Callable[[], int]) -> tuple[float, float, float, int]:
    """Creates `count` objects of `kind` at once and waits, on a watch, until every one shows `phase`;
    then checks each has its child (`children()` counts them). A watch, not polling: listing a few hundred
    objects twice a second would load the API server the operator is measured against.
    Returns (create seconds, converge seconds, operator CPU seconds, RSS bytes)."""
    plural = f"{kind.lower()}s"
    converged_at: list[float] = []

    def follow() -> None:
        reached: set[str] = set()
        stream = watch.Watch()
        for event in stream.stream(custom.list_namespaced_custom_object, "kubelm.io", "v1alpha1", namespace, plural,
                                   timeout_seconds=900):
            name = event["object"]["metadata"]["name"]
            if (event["object"].get("status") or {}).get("phase") == phase:
                reached.add(name)
            else:
                reached.discard(name)
            if len(reached) == count:
                converged_at.append(time.perf_counter())
                stream.stop()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    cpu_before, reconciles_before = operator.cpu_seconds(), _reconciles(operator, kind)
    started = time.perf_counter()
    create_s = _timed(count, clients, lambda i: custom.create_namespaced_custom_object(
        "kubelm.io", "v1alpha1", namespace, plural,
        {"apiVersion": "kubelm.io/v1alpha1", "kind": kind, "metadata": {"name": f"{kind.lower()}-{i:03d}"},
         "spec": spec}))
    follower.join(timeout=900)
    if not converged_at:
        raise TimeoutError(f"not every {kind} reached {phase} within 900 s")
    cpu, rss = operator.cpu_seconds() - cpu_before, operator.rss_bytes()
    reconciles = _reconciles(operator, kind) - reconciles_before
    print(f"{kind}s: reconciliations until converged, per object: "
          + ", ".join(f"{trigger} {n / count:.2f}" for trigger, n in reconciles.most_common()))
    found = children()
    if found != count:
        raise AssertionError(f"{count} {kind}s converged but {found} children exist")
    return create_s, converged_at[0] - started, cpu, rss


def _worker_deployment(namespace: str, i: int) -> dict[str, Any]:
    """The worker Deployment the operator would apply for LM_SPEC, without its owner (the baseline's)."""
    from kubelm_operator.builders import serving
    from kubelm_operator.builders.common import Owner
    from kubelm_operator.spec import parse_languagemodel

    owner = Owner("LanguageModel", namespace, f"baseline-{i:03d}", str(uuid.uuid4()))
    deployment = serving.children(owner, parse_languagemodel(LM_SPEC), image="kubelm-runtime:bench",
                                  model_source=LM_SPEC["model"], amqp_url="amqp://rabbitmq/", redis_url=None)[2]
    del deployment["metadata"]["ownerReferences"]
    return deployment


def _reaction(custom: Any, apps: Any, namespace: str, amqp_url: str) -> tuple[float, float]:
    """Seconds from a backlog to raised replicas, and from an empty queue back to zero."""
    import pika

    from kubelm_contract import queues

    custom.create_namespaced_custom_object("kubelm.io", "v1alpha1", namespace, "languagemodels", {
        "apiVersion": "kubelm.io/v1alpha1", "kind": "LanguageModel", "metadata": {"name": "reactive"},
        "spec": REACTIVE})

    def replicas() -> int:
        try:
            return int(apps.read_namespaced_deployment("reactive-worker", namespace).spec.replicas)
        except client.ApiException:
            return -1

    wait_for("reactive model at zero workers", lambda: replicas() == 0, timeout=300)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    queue = queues.request_queue(namespace, "reactive")
    started = time.perf_counter()
    for i in range(10):
        channel.basic_publish("", queue, b'{"v":1,"id":"r%d","prompt":"hi"}' % i)
    wait_for("replicas raised", lambda: replicas() > 0, timeout=120, interval=0.05)
    up = time.perf_counter() - started
    channel.queue_purge(queue)
    connection.close()
    started = time.perf_counter()
    wait_for("back to zero", lambda: replicas() == 0, timeout=120, interval=0.05)
    return up, time.perf_counter() - started


STEADY = {"model": {"hub": {"id": "openai-community/gpt2"}}, "gateway": {"enabled": False},
          "resources": {"cpu": "10m", "memory": "32Mi"},
          "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetQueueLengthPerReplica": 1000,
                          "activationQueueLength": 1000}}
"""Traffic that never reaches the activation length: the figures move, no worker pod starts."""


def _status_writes(operator: OperatorProcess) -> int:
    return sum(v for labels, v in _counter(operator.metrics_text(), "kubelm_operator_status_writes_total")
               if labels.get("kind") == "LanguageModel")


def _traffic(amqp_url: str, queue_names: list[str], seconds: float) -> int:
    """Publishes to each queue and takes the messages back off, a few per second per queue, for `seconds`
    (bounded in count and time); returns how many went through."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and sent < 1_000_000:
        for name in queue_names:
            channel.basic_publish("", name, b'{"v":1,"id":"s","prompt":"hi"}')
            sent += 1
        time.sleep(0.25)
        for name in queue_names:
            method, _, _ = channel.basic_get(name, auto_ack=True)
            if method is None:
                continue
    for name in queue_names:
        channel.queue_purge(name)
    connection.close()
    return sent


def _steady(operator: OperatorProcess, kubectl: Callable[..., str], custom: Any, apps: Any, core: Any,
            amqp_url: str, count: int, busy: int, window: float, clients: int) -> dict[str, float]:
    from kubelm_contract import queues

    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    _converge(operator, custom, namespace, "LanguageModel", STEADY, "Ready", count, clients,
              lambda: _count(apps.list_namespaced_deployment(namespace, _preload_content=False)))
    _settle(kubectl)
    names = [queues.request_queue(namespace, f"languagemodel-{i:03d}") for i in range(busy)]
    writes_before, api_before = _status_writes(operator), _writes(kubectl)
    cpu_before, started = operator.cpu_seconds(), time.perf_counter()
    sent = _traffic(amqp_url, names, window)
    elapsed = time.perf_counter() - started
    minutes = elapsed / 60
    api = sum((_writes(kubectl) - api_before).values())
    return {"writes_per_model_minute": (_status_writes(operator) - writes_before) / count / minutes,
            "writes_per_busy_model_minute": (_status_writes(operator) - writes_before) / busy / minutes,
            "api_writes_per_second": api / elapsed, "cpu_per_second": (operator.cpu_seconds() - cpu_before) / elapsed,
            "rss": operator.rss_bytes(), "messages": sent, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steady", type=int, default=500, help="LanguageModels in the steady-state phase (0: none)")
    parser.add_argument("--busy", type=int, default=50, help="of them, those with traffic")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--only-steady", action="store_true", help="the baseline and the steady state only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cluster = devcluster.up(tmp / "cluster")
        kubectl_path = cluster.layout.bin_dir / "kubectl"
        admin = cluster.layout.kubeconfig

        def kubectl(*argv: str, input: str | None = None) -> str:
            return subprocess.run([str(kubectl_path), f"--kubeconfig={admin}", *argv], check=True,
                                  capture_output=True, text=True, input=input).stdout

        operator: OperatorProcess | None = None
        steady: dict[str, float] | None = None
        try:
            install(kubectl)
            api = config.new_client_from_config(config_file=str(admin))
            api.configuration.connection_pool_maxsize = args.clients
            core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
            kubeconfig = service_account_kubeconfig(kubectl, admin, tmp / "operator-kubeconfig")
            operator = OperatorProcess(kubeconfig, cluster.layout.redis_url, tmp, env={
                "KUBELM_AMQP_URL": cluster.layout.amqp_url, "KUBELM_RABBITMQ_API_URL": cluster.layout.rabbitmq_api_url,
                "KUBELM_AUTOSCALE_INTERVAL_SECONDS": "1"})
            operator.start()
            operator.wait_healthy()
            baseline_ns, ns = f"bench-{uuid.uuid4().hex[:6]}", f"bench-{uuid.uuid4().hex[:6]}"
            for name in (baseline_ns, ns):
                core.create_namespace({"metadata": {"name": name}})

            baseline_s = _timed(args.count, args.clients, lambda i: core.create_namespaced_config_map(
                baseline_ns, {"metadata": {"name": f"cm-{i}"}, "data": {"k": "v"}}))
            apps = client.AppsV1Api(api)
            if args.only_steady:
                steady = _steady(operator, kubectl, custom, apps, core, cluster.layout.amqp_url, args.steady,
                                 args.busy, args.window, args.clients)
                _print_steady(args, steady, args.count / baseline_s)
                return

            _settle(kubectl)
            writes_before = _writes(kubectl)
            tj = _converge(operator, custom, ns, "TrainingJob", SPEC, "Suspended", args.count, args.clients,
                           lambda: _count(batch.list_namespaced_job(ns, _preload_content=False)))
            create_s, converge_s, operator_cpu_s, rss = tj
            writes_tj = _writes(kubectl)

            lm_ns = f"bench-{uuid.uuid4().hex[:6]}"
            core.create_namespace({"metadata": {"name": lm_ns}})
            _settle(kubectl)
            writes_quiet = _writes(kubectl)
            _, lm_converge_s, lm_cpu_s, lm_rss = _converge(
                operator, custom, lm_ns, "LanguageModel", LM_SPEC, "Ready", args.count, args.clients,
                lambda: _count(apps.list_namespaced_deployment(lm_ns, _preload_content=False)))
            writes_lm = _writes(kubectl)
            _settle(kubectl)
            deployments_s = _timed(args.count, args.clients, lambda i: apps.create_namespaced_deployment(
                baseline_ns, _worker_deployment(baseline_ns, i)))
            react_up_s, react_down_s = _reaction(custom, apps, lm_ns, cluster.layout.amqp_url)
            steady = _steady(operator, kubectl, custom, apps, core, cluster.layout.amqp_url, args.steady,
                             args.busy, args.window, args.clients) if args.steady else None
        finally:
            if operator is not None:
                operator.stop()
            devcluster.down(tmp / "cluster")

    operator_rate, baseline_rate = args.count / converge_s, args.count / baseline_s
    print(f"TrainingJobs:        {args.count} created in {create_s:.2f}s, all converged (children + status) "
          f"in {converge_s:.2f}s = {operator_rate:.1f}/s (goal >= 20/s)")
    print(f"baseline ConfigMaps: {args.count} created in {baseline_s:.2f}s = {baseline_rate:.1f}/s "
          f"(same client, {args.clients} concurrent)")
    print(f"ratio:               {operator_rate / baseline_rate:.2f}x of the API server's own create rate")
    print(f"operator CPU:        {operator_cpu_s:.2f}s in those {converge_s:.2f}s "
          f"({1000 * operator_cpu_s / args.count:.1f} ms per TrainingJob)")
    print(f"operator RSS after:  {rss / 2**20:.0f} MiB (goal <= 150 MB)")
    print(f"API writes:          {_per_object(writes_before, writes_tj, args.count)} (every client: "
          f"the create, the operator, the controllers)")
    lm_rate = args.count / lm_converge_s
    print(f"LanguageModels:      {args.count} converged (queues, registry entry, Deployment, status) in "
          f"{lm_converge_s:.2f}s = {lm_rate:.1f}/s (goal >= 20/s), {lm_rate / baseline_rate:.2f}x the baseline")
    print(f"operator CPU:        {lm_cpu_s:.2f}s ({1000 * lm_cpu_s / args.count:.1f} ms per LanguageModel), "
          f"RSS after {lm_rss / 2**20:.0f} MiB (goal <= 150 MB)")
    print(f"API writes:          {_per_object(writes_quiet, writes_lm, args.count)}")
    print(f"baseline Deployments: {args.count} worker Deployments (replicas 0) created in {deployments_s:.2f}s = "
          f"{args.count / deployments_s:.1f}/s; LanguageModels at {lm_rate * deployments_s / args.count:.2f}x that")
    print(f"autoscaler:          backlog -> replicas raised in {react_up_s:.2f}s (goal <= 5 s; KEDA's defaults: "
          f"30 s polling + HPA sync); empty queue -> zero in {react_down_s:.2f}s with a 5 s window")
    if steady:
        _print_steady(args, steady, baseline_rate)


def _print_steady(args: argparse.Namespace, steady: dict[str, float], baseline_rate: float) -> None:
    print(f"steady state:        {args.steady} LanguageModels, traffic on {args.busy} for {steady['seconds']:.0f}s "
          f"({steady['messages']:.0f} messages)")
    print(f"status writes:       {steady['writes_per_model_minute']:.2f} per model per minute "
          f"({steady['writes_per_busy_model_minute']:.2f} per busy model, were they all theirs)")
    print(f"API server writes:   {steady['api_writes_per_second']:.1f}/s, "
          f"{steady['api_writes_per_second'] / baseline_rate:.3f}x its own create rate ({baseline_rate:.0f}/s)")
    print(f"operator:            {steady['cpu_per_second']:.2f} cores, RSS {steady['rss'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
