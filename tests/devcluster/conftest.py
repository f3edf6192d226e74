from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from node_support import RealNode, real_node_cluster


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
