"""Helpers for the tests that run pods on the dev cluster's real node (importable as `node_support`)."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubelm_devcluster import cli, hostnet
from support import ClusterEnv, eventually

RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""The container securityContext of the restricted Pod Security Standard, read-only root included."""


@dataclass(frozen=True)
class RealNode:
    root: Path
    env: ClusterEnv
    images: tuple[str, ...]
    host_before: dict[str, str]

    def image(self, repository: str) -> str:
        """The content-tagged reference of one of kubelm's images, as imported into the node."""
        return next(ref for ref in self.images if ref.rsplit(":", 1)[0] == repository)


@contextmanager
def real_node_cluster(root: Path) -> Iterator[RealNode]:
    if os.geteuid() != 0:
        pytest.skip("a real node needs root")
    before = hostnet.read_sysctls()
    # The first start on a machine imports the images into the node's store: minutes for the runtime.
    started = cli.up(root, timeout=1800, parent_pid=os.getpid(), real_node=True)
    env = started.env()
    try:
        yield RealNode(root, ClusterEnv(env["KUBECONFIG"], "", "", "", str(started.layout.bin_dir / "kubectl")),
                       started.layout.images, before)
    finally:
        cli.down(root)


def apply(node: RealNode, namespace: str, *objects: dict) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    node.env.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(items))


def pod_phase(node: RealNode, namespace: str, name: str) -> str:
    return node.env.kubectl("get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}", check=False).stdout


def python_pod(name: str, image: str, script: str, **spec: object) -> dict:
    """A pod that runs a Python script under the restricted securityContext, with writable cache and /tmp."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
            "containers": [{
                "name": "main",
                "image": image,
                "command": ["python", "-c", textwrap.dedent(script)],
                "securityContext": RESTRICTED,
                "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/kubelm"},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
            **spec,
        },
    }


def wait_succeeded(node: RealNode, namespace: str, name: str, timeout: float = 300) -> str:
    """Waits for a pod to finish; its logs, read through the kubelet. A failed pod fails the test with them."""
    eventually(lambda: pod_phase(node, namespace, name) in ("Succeeded", "Failed"), timeout, 0.5,
               f"pod {name} finished")
    logs = node.env.kubectl("logs", "-n", namespace, name).stdout
    assert pod_phase(node, namespace, name) == "Succeeded", logs
    return logs
