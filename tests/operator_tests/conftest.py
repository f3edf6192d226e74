"""The operator under test: a separate `kubelm-operator` process on the real control plane and Redis,
authenticated with a token of the shipped ServiceAccount bound by the shipped roles (never admin)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kubernetes import client

from kubelm_devcluster.operator import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    install,
    service_account_kubeconfig,
)
from support import REPO, ClusterEnv, eventually

GROUP, VERSION = "kubelm.io", "v1alpha1"
__all__ = ["OPERATOR_NAMESPACE", "SERVICE_ACCOUNT", "Api", "OperatorProcess"]


def _kubectl(cluster: ClusterEnv) -> Callable[..., str]:
    def run(*args: str, input: str | None = None) -> str:
        return cluster.kubectl(*args, input=input).stdout
    return run


@pytest.fixture(scope="session")
def installed(cluster: ClusterEnv, crds: None) -> None:
    """The shipped base (CRDs, namespace) and RBAC, applied as a user would."""
    install(_kubectl(cluster), field_manager="kubelm-tests")


@pytest.fixture(scope="session")
def keda_crds(cluster: ClusterEnv) -> None:
    """KEDA's real ScaledObject and TriggerAuthentication CRDs, from KEDA's Go module (setup caches them)."""
    script = REPO / "devcluster" / "scripts" / "fetch-keda-crds.sh"
    directory = Path(subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
                     .stdout.strip().splitlines()[-1])
    for crd in sorted(directory.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--field-manager=kubelm-tests", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/scaledobjects.keda.sh", "crd/triggerauthentications.keda.sh")


@pytest.fixture(scope="module")
def operator(cluster: ClusterEnv, installed: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator process for these tests, on a token of the shipped ServiceAccount (never admin).
    It stops when they end: it would otherwise write the status of objects other tests set by hand."""
    directory = tmp_path_factory.mktemp("operator")
    kubeconfig = service_account_kubeconfig(_kubectl(cluster), Path(cluster.kubeconfig), directory / "kubeconfig")
    process = OperatorProcess(kubeconfig, cluster.redis_url, directory, env={
        "KUBELM_PROGRESS_INTERVAL_SECONDS": "1", "KUBELM_AUTOSCALE_INTERVAL_SECONDS": "1",
        "KUBELM_RESYNC_INTERVAL_SECONDS": "20",
        "KUBELM_RUNTIME_IMAGE": "kubelm/runtime:test", "KUBELM_AMQP_URL": cluster.amqp_url,
        "KUBELM_RABBITMQ_API_URL": cluster.rabbitmq_api_url})
    process.start()
    process.wait_healthy()
    yield process
    process.stop()


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The shared operator, started again if a test stopped or killed it."""
    if not operator.running:
        operator.start()
    operator.wait_healthy()
    return operator


@pytest.fixture
def restricted_namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A namespace where Pod Security Admission enforces the `restricted` level."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    yield name
    for pod in core.list_namespaced_pod(name).items:
        core.delete_namespaced_pod(pod.metadata.name, name, grace_period_seconds=0)
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def redis_client(cluster: ClusterEnv) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url)


@dataclass
class Api:
    """Short-hands over the admin client for what the tests read and drive."""

    api_client: client.ApiClient
    custom: client.CustomObjectsApi

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)

    def create_tj(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, "trainingjobs",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec})

    def tj(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, "trainingjobs", name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.tj(namespace, name).get("status") or {})

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(namespace, name).get("conditions", []) if c["type"] == type_), {})

    def wait_status(self, namespace: str, name: str, check: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = 120) -> dict[str, Any]:
        eventually(lambda: check(self.status(namespace, name)), timeout=timeout, what=f"{name}: {what}")
        return self.status(namespace, name)

    def events(self, namespace: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]

    def pods(self, namespace: str, job: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
                    .items)

    def finish_pod(self, namespace: str, pod: str, *, exit_code: int, reason: str, message: str = "") -> None:
        """What a kubelet reports when the trainer container ends."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}
        if message:
            terminated["message"] = message
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "train", "image": "kubelm/runtime:test", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}]}})

    def run_pod(self, namespace: str, pod: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": {
            "phase": "Running", "startTime": now,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "train", "image": "kubelm/runtime:test", "imageID": "", "ready": True,
                                   "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}}}]}})


@pytest.fixture
def api(api_client: client.ApiClient, custom: client.CustomObjectsApi) -> Api:
    return Api(api_client, custom)
