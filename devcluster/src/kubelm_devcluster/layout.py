"""Where a dev cluster keeps its files and which loopback ports it uses."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("KUBELM_DEV_DIR", Path.home() / ".local/state/kubelm/devcluster"))
HOST = "127.0.0.1"
NODE_NAME = "kubelm-local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
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
        return {"root": str(self.root), "bin_dir": str(self.bin_dir), "ports": asdict(self.ports)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Layout:
        ports = data["ports"]
        assert isinstance(ports, dict)
        return cls(Path(str(data["root"])), Path(str(data["bin_dir"])), Ports(**ports))


def read_state(root: Path) -> dict[str, object] | None:
    try:
        return json.loads((root / "state.json").read_text())
    except FileNotFoundError:
        return None
