"""Session fixtures: the real control plane, Redis and RabbitMQ.

A dev cluster is started once per test run (about 15 s) unless KUBECONFIG points
at an existing cluster; then KUBELM_REDIS_URL, KUBELM_AMQP_URL and
KUBELM_RABBITMQ_API_URL name its services and KUBELM_DEV_BIN_DIR (or PATH) its kubectl.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from kubelm_contract import env as contract_env
from node_support import RealNode, real_node_cluster
from support import REPO, ClusterEnv


def _existing_cluster() -> ClusterEnv | None:
    kubeconfig = os.environ.get(contract_env.KUBECONFIG)
    if not kubeconfig:
        return None
    bin_dir = os.environ.get("KUBELM_DEV_BIN_DIR")
    kubectl = str(Path(bin_dir) / "kubectl") if bin_dir else shutil.which("kubectl")
    if not kubectl:
        pytest.exit("KUBECONFIG is set but no kubectl found (set KUBELM_DEV_BIN_DIR or PATH)", returncode=2)
    return ClusterEnv(
        kubeconfig,
        os.environ.get(contract_env.REDIS_URL, ""),
        os.environ.get(contract_env.AMQP_URL, ""),
        os.environ.get(contract_env.RABBITMQ_API_URL, ""),
        kubectl,
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterEnv]:
    existing = _existing_cluster()
    if existing:
        yield existing
        return
    from kubelm_devcluster import cli

    root = tmp_path_factory.mktemp("devcluster")
    started = cli.up(root, parent_pid=os.getpid())
    env = started.env()
    try:
        yield ClusterEnv(
            env[contract_env.KUBECONFIG],
            env[contract_env.REDIS_URL],
            env[contract_env.AMQP_URL],
            env[contract_env.RABBITMQ_API_URL],
            str(started.layout.bin_dir / "kubectl"),
        )
    finally:
        cli.down(root)


@pytest.fixture(scope="session")
def crds(cluster: ClusterEnv) -> None:
    """The kubelm CRDs, applied with kubectl server-side and Established."""
    cluster.kubectl("apply", "--server-side", "--field-manager=kubelm-tests", "-k", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/languagemodels.kubelm.io", "crd/trainingjobs.kubelm.io")


@pytest.fixture(scope="session")
def api_client(cluster: ClusterEnv) -> client.ApiClient:
    return config.new_client_from_config(config_file=cluster.kubeconfig)


@pytest.fixture(scope="session")
def custom(api_client: client.ApiClient, crds: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A namespace per test, deleted afterwards (the namespace controller empties it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    # No kubelet confirms that a pod stopped: remove pods at once so the namespace can go.
    for pod in core.list_namespaced_pod(name).items:
        core.delete_namespaced_pod(pod.metadata.name, name, grace_period_seconds=0)
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A dev cluster with a real node, for one test module (one real node per machine at a time)."""
    with real_node_cluster(tmp_path_factory.mktemp("realnode")) as node:
        yield node


@pytest.fixture
def node_namespace(real_node: RealNode) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    real_node.env.kubectl("create", "namespace", name)
    yield name
    real_node.env.kubectl("delete", "namespace", name, "--wait=false", check=False)
