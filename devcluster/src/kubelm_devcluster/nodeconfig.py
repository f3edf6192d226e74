"""The real node's components: containerd, kubelet, kube-proxy and CoreDNS.

Pure functions of a Layout, like components.py; hostnet.py does what they cannot
(the bridge, sysctls, iptables, mounts). docs/devcluster.md explains each
machine-specific setting with the symptom that asked for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .components import Component
from .layout import BRIDGE, COREDNS_USER, HOST, NODE_IP, NODE_NAME, POD_CIDR, Layout
from .pki import ClusterPKI

CLUSTER_DOMAIN = "cluster.local"
RUN_DIR = Path("/run/kubelm-node")
"""One real node per machine: its sockets and runtime state have fixed places."""
STORE_DIR = Path("/var/lib/kubelm-node")
CONTAINERD_SOCKET = RUN_DIR / "containerd.sock"
CONTAINERD_NAMESPACE = "k8s.io"
COREDNS_READY_PORT = 8181


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @property
    def containerd_root(self) -> Path:
        # The node's image store outlives the cluster, like a real node's: an image is imported
        # once per build, not at every `up` (the runtime image is several GB).
        return STORE_DIR / "containerd"

    @property
    def containerd_state(self) -> Path:
        return RUN_DIR / "containerd"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"


def normalized(ref: str) -> str:
    """An image reference as containerd names it: Docker Hub's domain and library path spelled out."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if "/" in ref else f"docker.io/library/{ref}"


def repository(ref: str) -> str:
    name, _, tag = ref.rpartition(":")
    return name if name and "/" not in tag else ref


def unnamed_images(listing: str) -> list[str]:
    """From `ctr images ls`, the image-ID references (`sha256:<id>`) that no named reference shares a
    target with. containerd's CRI adds such a reference for every image it sees; once the names of an
    older build are removed, it alone keeps that build's layers on disk."""
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    named = {row[2] for row in rows if not row[0].startswith("sha256:")}
    return [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in named]


def node_paths(layout: Layout) -> NodePaths:
    return node_paths_of(layout.root)


def node_paths_of(cluster_root: Path) -> NodePaths:
    return NodePaths(cluster_root / "node")


def containerd(layout: Layout, sandbox_image: str) -> Component:
    paths = node_paths(layout)
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    images = "plugins.'io.containerd.cri.v1.images'"
    config = "\n".join([
        "version = 3",
        f"root = {json.dumps(str(paths.containerd_root))}",
        f"state = {json.dumps(str(paths.containerd_state))}",
        "[grpc]",
        f"  address = {json.dumps(str(CONTAINERD_SOCKET))}",
        f"[{images}]",
        "  snapshotter = 'overlayfs'",
        f"[{images}.pinned_images]",
        # No registry is reachable: the sandbox image is one of ours, imported before the kubelet starts.
        f"  sandbox = {json.dumps(sandbox_image)}",
        f"[{runtime}]",
        # root here lacks CAP_SYS_RESOURCE: lowering a sandbox's oom_score_adj below containerd's own
        # fails ("failed to update /proc/self/oom_score_adj: Permission denied") and no pod starts.
        "  restrict_oom_score_adj = true",
        "  disable_apparmor = true",
        "  netns_mounts_under_state_dir = true",
        f"[{runtime}.containerd.runtimes.runc]",
        "  runtime_type = 'io.containerd.runc.v2'",
        "  disable_pause_image_pull = true",
        f"[{runtime}.cni]",
        f"  bin_dirs = [{json.dumps(str(layout_node_bin(layout) / 'cni'))}]",
        f"  conf_dir = {json.dumps(str(paths.cni_conf_dir))}",
        "[plugins.'io.containerd.grpc.v1.cri']",
        f"  stream_server_address = {json.dumps(HOST)}",
        "",
    ])
    config_path = layout.root / "containerd.toml"
    return Component(
        "containerd",
        [str(layout_node_bin(layout) / "containerd"), "--config", str(config_path), "--log-level", "warn"],
        # The runc shim is found on PATH, next to containerd.
        env={"PATH": f"{layout_node_bin(layout)}:/usr/sbin:/usr/bin:/sbin:/bin"},
        files={config_path: config, paths.cni_conf_dir / "10-kubelm.conflist": cni_config(paths)},
    )


PAUSE_REPOSITORY = "kubelm/pause"


def sandbox_image(images: tuple[str, ...]) -> str:
    """The pause image among those the node imports: no registry can provide one."""
    for ref in images:
        if repository(ref) == PAUSE_REPOSITORY:
            return ref
    raise ValueError(f"no {PAUSE_REPOSITORY} image among the node's images: {sorted(images)}")


def cni_config(paths: NodePaths) -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "kubelm",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni_ipam_dir),
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2)


def layout_node_bin(layout: Layout) -> Path:
    if layout.node_bin_dir is None:
        raise ValueError("this dev cluster has no real node")
    return layout.node_bin_dir


def kubelet_config(layout: Layout, pki: ClusterPKI) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": layout.ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": HOST,
        "healthzPort": layout.ports.kubelet_healthz,
        "tlsCertFile": str(pki.kubelet_serving.cert),
        "tlsPrivateKeyFile": str(pki.kubelet_serving.key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca.cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        # This machine's cgroups are v1, which the kubelet refuses unless told otherwise, and no
        # systemd manages them.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "/etc/resolv.conf",
        "podCIDR": POD_CIDR,
        "podLogsDir": str(node_paths(layout).pod_logs),
        # The disk is shared with builds and caches: evict only when it is really full, and never
        # collect our images (they cannot be pulled back).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "registerNode": True,
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "runtimeRequestTimeout": "5m",
    }


def kubelet(layout: Layout, pki: ClusterPKI, kubeconfig_path: Path) -> Component:
    config_path = layout.root / "kubelet.yaml"
    return Component(
        "kubelet",
        [
            str(layout_node_bin(layout) / "kubelet"),
            f"--config={config_path}",
            f"--kubeconfig={kubeconfig_path}",
            f"--root-dir={node_paths(layout).kubelet_root}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--node-labels=kubelm.io/local-node=true",
            "--v=0",
        ],
        env={"PATH": f"{layout_node_bin(layout)}:/usr/sbin:/usr/bin:/sbin:/bin"},
        files={config_path: yaml.safe_dump(kubelet_config(layout, pki))},
    )


def kube_proxy(layout: Layout, kubeconfig_path: Path) -> Component:
    config_path = layout.root / "kube-proxy.yaml"
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path)},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": HOST,
        "healthzBindAddress": f"{HOST}:{layout.ports.kube_proxy_healthz}",
        "metricsBindAddress": f"{HOST}:{layout.ports.kube_proxy_metrics}",
        # Leave the machine's conntrack table sizes and timeouts as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
    }
    return Component(
        "kube-proxy",
        [str(layout_node_bin(layout) / "kube-proxy"), f"--config={config_path}", "--v=0"],
        files={config_path: yaml.safe_dump(config)},
    )


def coredns(layout: Layout, kubeconfig_path: Path) -> Component:
    corefile_path = layout.root / "Corefile"
    corefile = f"""\
.:53 {{
    bind {NODE_IP}
    errors
    ready {HOST}:{COREDNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig_path} kubelm-dev
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
    loop
}}
"""
    return Component(
        "coredns",
        [str(layout_node_bin(layout) / "coredns"), "-conf", str(corefile_path)],
        files={corefile_path: corefile},
    )


def node_rbac() -> list[dict[str, object]]:
    """Without the Node authorizer the node's user needs the system:node role bound; CoreDNS reads Services."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubelm-dev:nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": COREDNS_USER},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": COREDNS_USER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": COREDNS_USER},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}],
        },
    ]

