from __future__ import annotations

from pathlib import Path

from kubelm_devcluster import components
from kubelm_devcluster.layout import Layout, Ports
from kubelm_devcluster.pki import create_pki


def _layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path, Path("/opt/bin"), Ports(*range(30001, 30015)))


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


def test_ports_are_distinct_loopback_ports() -> None:
    ports = Ports.allocate()
    values = list(vars(ports).values())
    assert len(set(values)) == len(values) and all(1024 < p < 65536 for p in values)


def test_apiserver_flags(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    pki = create_pki(tmp_path / "pki")
    flags = _flags(components.apiserver(layout, pki).argv)
    assert flags["etcd-servers"] == "http://127.0.0.1:30001"
    assert flags["secure-port"] == "30003" and flags["bind-address"] == "127.0.0.1"
    assert flags["authorization-mode"] == "RBAC"
    assert flags["client-ca-file"] == str(pki.ca.cert)
    assert flags["service-account-signing-key-file"] == str(pki.service_account_key)
    # The default admission plugins (ServiceAccount among them) stay on: nothing disables them.
    assert "disable-admission-plugins" not in flags


def test_everything_listens_on_loopback_only(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    pki = create_pki(tmp_path / "pki")
    etcd = _flags(components.etcd(layout).argv)
    assert all("127.0.0.1" in etcd[k] for k in ("listen-client-urls", "listen-peer-urls"))
    for c in (components.controller_manager(layout, pki, tmp_path / "k"), components.scheduler(layout, tmp_path / "k")):
        assert _flags(c.argv)["bind-address"] == "127.0.0.1"
    redis = components.redis(layout).argv
    assert redis[redis.index("--bind") + 1] == "127.0.0.1"
    rabbit = components.rabbitmq(layout)
    assert rabbit.env["RABBITMQ_NODE_IP_ADDRESS"] == "127.0.0.1"
    conf = next(text for path, text in rabbit.files.items() if path.name == "rabbitmq.conf")
    assert "management.tcp.ip = 127.0.0.1" in conf and "listeners.tcp.default = 127.0.0.1:30007" in conf


def test_kubeconfig_points_at_the_cluster(tmp_path: Path) -> None:
    cfg = components.kubeconfig("https://127.0.0.1:1", tmp_path / "ca", tmp_path / "c", tmp_path / "k", "admin")
    assert cfg["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1"  # type: ignore[index]
    assert cfg["current-context"] == "kubelm-dev"
