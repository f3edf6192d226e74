from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from support import ClusterEnv

GROUP, VERSION = "kubelm.io", "v1alpha1"


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
    core.delete_namespace(name)
