"""The dev cluster's one Node, kept Ready by the supervisor's heartbeat.

No kubelet runs here yet: the Node exists so the scheduler has somewhere to
place pods and the node lifecycle controller leaves it untainted.
"""

from __future__ import annotations

import datetime
import os
import platform

NODE_LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def node_object(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": GO_ARCH.get(platform.machine(), platform.machine()),
                "kubelm.io/local-node": "true",
            },
        },
        "spec": {},
    }


def node_status(version: str, ready_since: str) -> dict[str, object]:
    now_ = now()
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_bytes() // 1024}Ki", "pods": "110"}
    return {
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelm dev cluster node heartbeat",
                    "lastHeartbeatTime": now_,
                    "lastTransitionTime": ready_since,
                },
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "localhost"}],
            "nodeInfo": {
                "architecture": platform.machine(),
                "operatingSystem": "linux",
                "osImage": platform.platform(),
                "kernelVersion": platform.release(),
                "kubeletVersion": version,
                "kubeProxyVersion": version,
                "containerRuntimeVersion": "kubelm-dev://0",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
    }


def lease_object(name: str) -> dict[str, object]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NODE_LEASE_NAMESPACE},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": now},
    }
