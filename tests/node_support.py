"""Helpers for the tests that run pods on the dev cluster's real node (importable as `node_support`)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubelm_devcluster import cli, hostnet, mainjob
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
    dev_node: bool = True
    """The dev cluster's own node (host-level checks apply), not an existing cluster's."""

    def image(self, repository: str) -> str:
        """The content-tagged reference of one of kubelm's images, as imported into the node."""
        return next(ref for ref in self.images if ref.rsplit(":", 1)[0] == repository)


NODE_KUBECONFIG = "KUBELM_NODE_KUBECONFIG"
"""Runs the node tests on an existing cluster (kind, a real one) whose nodes have kubelm's images."""


@contextmanager
def real_node_cluster(root: Path) -> Iterator[RealNode]:
    if kubeconfig := os.environ.get(NODE_KUBECONFIG):
        bin_dir = os.environ.get("KUBELM_DEV_BIN_DIR")
        kubectl = str(Path(bin_dir) / "kubectl") if bin_dir else "kubectl"
        yield RealNode(root, ClusterEnv(kubeconfig, "", "", "", kubectl), cli.node_images(), {}, dev_node=False)
        return
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


def kubectl_process(node: RealNode, *args: str) -> subprocess.Popen[str]:
    """kubectl running on (a watch, logs -f): its output as it comes."""
    return subprocess.Popen([node.env.kubectl_path, f"--kubeconfig={node.env.kubeconfig}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextmanager
def port_forward(node: RealNode, namespace: str, target: str, port: int) -> Iterator[str]:
    """`kubectl port-forward` to a pod or Service: its URL on loopback, from any cluster."""
    with mainjob.port_forward([node.env.kubectl_path, f"--kubeconfig={node.env.kubeconfig}"], namespace, target,
                              port) as url:
        yield url


def deployment(name: str, container: dict[str, Any], **pod_spec: Any) -> dict[str, Any]:
    """One replica of one container, selected by `app: <name>`."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container], **pod_spec}},
        },
    }


def answers(url: str) -> bool:
    """The URL answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


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
