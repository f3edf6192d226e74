"""The real node's configuration, as pure functions of a Layout (no node started here)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from kubelm_devcluster import components, nodeconfig
from kubelm_devcluster.layout import BRIDGE, NODE_IP, POD_CIDR, Layout, Ports
from kubelm_devcluster.pki import create_pki

PAUSE = "kubelm/pause:abc"
IMAGES = (PAUSE, "kubelm/runtime:dev-1")


def _layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path, Path("/opt/bin"), Ports(*range(30001, 30015)), Path("/opt/node"), IMAGES)


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


def test_containerd_pins_our_sandbox_image_and_lowers_no_oom_score(tmp_path: Path) -> None:
    component = nodeconfig.containerd(_layout(tmp_path), nodeconfig.sandbox_image(IMAGES))
    config = tomllib.loads(component.files[tmp_path / "containerd.toml"])
    assert config["version"] == 3 and config["grpc"]["address"] == str(nodeconfig.CONTAINERD_SOCKET)
    images = config["plugins"]["io.containerd.cri.v1.images"]
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert images["pinned_images"]["sandbox"] == PAUSE
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["containerd"]["runtimes"]["runc"]["disable_pause_image_pull"] is True
    assert runtime["cni"]["bin_dirs"] == ["/opt/node/cni"]
    # The image store is the node's, outside the cluster's directory; runtime state under /run.
    assert config["root"] == "/var/lib/kubelm-node/containerd"
    assert config["state"].startswith(str(nodeconfig.RUN_DIR))


def test_the_cni_network_is_the_bridge_whose_address_is_the_node_ip(tmp_path: Path) -> None:
    paths = nodeconfig.node_paths(_layout(tmp_path))
    network = json.loads(nodeconfig.cni_config(paths))
    bridge = network["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["bridge"] == BRIDGE and bridge["isGateway"]
    (ipam_range,) = bridge["ipam"]["ranges"][0]
    assert ipam_range == {"subnet": POD_CIDR, "gateway": NODE_IP}
    assert ipaddress.ip_address(NODE_IP) in ipaddress.ip_network(POD_CIDR)
    assert bridge["ipam"]["dataDir"].startswith(str(tmp_path))


def test_the_kubelet_runs_on_cgroup_v1_without_systemd_and_never_collects_our_images(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    pki = create_pki(tmp_path / "pki")
    component = nodeconfig.kubelet(layout, pki, tmp_path / "kubelet.kubeconfig")
    config = yaml.safe_load(component.files[tmp_path / "kubelet.yaml"])
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs" and config["failSwapOn"] is False
    assert config["address"] == NODE_IP and config["clusterDNS"] == [NODE_IP]
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["imageGCHighThresholdPercent"] == 100
    flags = _flags(component.argv)
    assert flags["node-ip"] == NODE_IP and flags["root-dir"].startswith(str(tmp_path))


def test_node_certificates_name_the_node_and_its_address(tmp_path: Path) -> None:
    pki = create_pki(tmp_path)
    client = x509.load_pem_x509_certificate(pki.kubelet_client.cert.read_bytes())
    assert client.subject.rfc4514_string() == "O=system:nodes,CN=system:node:kubelm-local"
    for pair in (pki.kubelet_serving, pki.apiserver):
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress)
        assert ipaddress.ip_address(NODE_IP) in ips


def test_the_apiserver_of_a_real_node_is_reachable_from_pods_and_reaches_the_kubelet(tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki")
    flags = _flags(components.apiserver(_layout(tmp_path), pki).argv)
    assert flags["bind-address"] == "0.0.0.0" and flags["advertise-address"] == NODE_IP
    assert flags["endpoint-reconciler-type"] == "lease"
    assert flags["kubelet-client-certificate"] == str(pki.apiserver_kubelet_client.cert)
    heartbeat = Layout(tmp_path, Path("/opt/bin"), Ports(*range(30001, 30015)))
    assert _flags(components.apiserver(heartbeat, pki).argv)["endpoint-reconciler-type"] == "none"


def test_a_node_without_a_pause_image_is_refused_with_the_images_it_has() -> None:
    with pytest.raises(ValueError, match="kubelm/runtime:dev-1"):
        nodeconfig.sandbox_image(("kubelm/runtime:dev-1",))


def test_layout_round_trips_the_node_fields(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    assert layout.real_node and not Layout.from_json({**layout.to_json(), "node_bin_dir": None}).real_node


@pytest.mark.parametrize(("ref", "expected"), [
    ("kubelm/runtime:dev-1", "docker.io/kubelm/runtime:dev-1"),
    ("redis:7", "docker.io/library/redis:7"),
    ("registry.example.com/kubelm/runtime:0.1.0", "registry.example.com/kubelm/runtime:0.1.0"),
    ("localhost:5000/x:1", "localhost:5000/x:1"),
])
def test_image_references_are_compared_as_containerd_names_them(ref: str, expected: str) -> None:
    assert nodeconfig.normalized(ref) == expected
    assert nodeconfig.repository(expected) == expected.rsplit(":", 1)[0]
    assert nodeconfig.repository("localhost:5000/x") == "localhost:5000/x"


def test_image_id_references_no_name_shares_a_target_with_are_the_unnamed_ones() -> None:
    kind = "application/vnd.docker.distribution.manifest.v2+json"
    listing = "\n".join([
        "REF TYPE DIGEST SIZE PLATFORMS LABELS",
        f"docker.io/kubelm/runtime:dev-new {kind} sha256:new 5.8 GiB linux/amd64 io.cri-containerd.image=managed",
        f"docker.io/kubelm/runtime:0.1.0 {kind} sha256:new 5.8 GiB linux/amd64 io.cri-containerd.image=managed",
        f"sha256:id-of-new {kind} sha256:new 5.8 GiB linux/amd64 io.cri-containerd.image=managed",
        f"sha256:id-of-old {kind} sha256:old 5.8 GiB linux/amd64 io.cri-containerd.image=managed",
        f"sha256:id-of-older {kind} sha256:older 5.8 GiB linux/amd64 io.cri-containerd.image=managed",
        ""])
    assert nodeconfig.unnamed_images(listing) == ["sha256:id-of-old", "sha256:id-of-older"]
    assert nodeconfig.unnamed_images("REF TYPE DIGEST SIZE PLATFORMS LABELS\n") == []
