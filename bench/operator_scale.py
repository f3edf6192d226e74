"""Operator throughput: 200 TrainingJobs created at once, time until every one has its children and status.

The operator runs as a local process on the dev cluster with the shipped RBAC. The
baseline, measured in the same run with the same client and concurrency, is the
API server's own rate for creating 200 ConfigMaps. Printed: converged TrainingJobs
per second, the baseline's creates per second, their ratio, and the operator's RSS.

    python bench/operator_scale.py [--count 200] [--clients 8]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from kubelm_devcluster import cli as devcluster
from kubelm_devcluster.operator import OperatorProcess, install, service_account_kubeconfig
from kubelm_devcluster.probes import wait_for

SPEC = {"baseModel": {"hub": {"id": "openai-community/gpt2"}}, "dataset": {"train": "/data/train.txt"},
        "resources": {"cpu": "10m", "memory": "32Mi"}, "suspend": True}


def _timed(count: int, clients: int, create: Callable[[int], Any]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(create, range(count)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
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
        try:
            install(kubectl)
            api = config.new_client_from_config(config_file=str(admin))
            api.configuration.connection_pool_maxsize = args.clients
            core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
            kubeconfig = service_account_kubeconfig(kubectl, admin, tmp / "operator-kubeconfig")
            operator = OperatorProcess(kubeconfig, cluster.layout.redis_url, tmp)
            operator.start()
            operator.wait_healthy()
            baseline_ns, ns = f"bench-{uuid.uuid4().hex[:6]}", f"bench-{uuid.uuid4().hex[:6]}"
            for name in (baseline_ns, ns):
                core.create_namespace({"metadata": {"name": name}})

            baseline_s = _timed(args.count, args.clients, lambda i: core.create_namespaced_config_map(
                baseline_ns, {"metadata": {"name": f"cm-{i}"}, "data": {"k": "v"}}))

            def converged() -> bool:
                items = custom.list_namespaced_custom_object("kubelm.io", "v1alpha1", ns, "trainingjobs")["items"]
                done = sum(1 for tj in items if (tj.get("status") or {}).get("phase") == "Suspended")
                jobs = len(batch.list_namespaced_job(ns).items)
                return done == args.count and jobs == args.count

            cpu_before = operator.cpu_seconds()
            started = time.perf_counter()
            create_s = _timed(args.count, args.clients, lambda i: custom.create_namespaced_custom_object(
                "kubelm.io", "v1alpha1", ns, "trainingjobs",
                {"apiVersion": "kubelm.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": f"tj-{i:03d}"},
                 "spec": SPEC}))
            wait_for("every TrainingJob converged", converged, timeout=600, interval=0.25)
            converge_s = time.perf_counter() - started
            operator_cpu_s = operator.cpu_seconds() - cpu_before
            rss = operator.rss_bytes()
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


if __name__ == "__main__":
    main()
