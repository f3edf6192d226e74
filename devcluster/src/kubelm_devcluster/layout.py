"""Where a dev cluster keeps its files and which loopback ports it uses."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parents[3] / "devcluster" / "scripts"
"""The build scripts (control plane, real node, images): the dev cluster runs from a checkout."""
IMAGES_SCRIPT = SCRIPTS_DIR / "build-images.sh"
DEFAULT_DIR = Path(os.environ.get("KUBELM_DEV_DIR", Path.home() / ".local/state/kubelm/devcluster"))
HOST = "127.0.0.1"
NODE_NAME = "kubelm-local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# A real node's network: pods on a bridge whose own address is the node's InternalIP, the pods'
# gateway and their way to services on the host.
BRIDGE = "kubelm0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
COREDNS_USER = "kubelm-dev:coredns"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    redis: int
    amqp: int
    rabbitmq_management: int
    rabbitmq_dist: int
    epmd: int
    kubelet: int
    kubelet_healthz: int
    kube_proxy_healthz: int
    kube_proxy_metrics: int

    @classmethod
    def allocate(cls) -> Ports:
        """Free loopback ports, all held open until every one is chosen so none repeats."""
        sockets = []
        try:
            for _ in cls.__dataclass_fields__:
                s = socket.socket()
                s.bind((HOST, 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


@dataclass(frozen=True)
class Layout:
    root: Path
    bin_dir: Path
    ports: Ports
    node_bin_dir: Path | None = None
    """Where the real node's programs are; None: a heartbeat Node that runs no pods."""
    images: tuple[str, ...] = ()
    """Images the real node imports (from the image build) before its kubelet starts."""

    @property
    def real_node(self) -> bool:
        return self.node_bin_dir is not None

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def data_dir(self, component: str) -> Path:
        return self.root / "data" / component

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def apiserver_url(self) -> str:
        return f"https://{HOST}:{self.ports.apiserver}"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.ports.redis}/0"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.ports.amqp}/%2F"

    @property
    def rabbitmq_api_url(self) -> str:
        return f"http://guest:guest@{HOST}:{self.ports.rabbitmq_management}"

    def to_json(self) -> dict[str, object]:
        return {"root": str(self.root), "bin_dir": str(self.bin_dir), "ports": asdict(self.ports),
                "node_bin_dir": str(self.node_bin_dir) if self.node_bin_dir else None, "images": list(self.images)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Layout:
        ports = data["ports"]
        assert isinstance(ports, dict)
        node_bin_dir = data.get("node_bin_dir")
        images = data.get("images") or []
        assert isinstance(images, list)
        return cls(Path(str(data["root"])), Path(str(data["bin_dir"])), Ports(**ports),
                   Path(str(node_bin_dir)) if node_bin_dir else None, tuple(images))


def read_state(root: Path) -> dict[str, object] | None:
    try:
        return json.loads((root / "state.json").read_text())
    except FileNotFoundError:
        return None
