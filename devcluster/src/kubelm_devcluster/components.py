"""Command lines and configuration files of each dev cluster component.

Pure functions of a Layout: the supervisor runs what they return. Flags are
explained where the reason is not obvious; docs/devcluster.md has the overview.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .layout import HOST, NODE_IP, SERVICE_ACCOUNT_ISSUER, SERVICE_CLUSTER_IP_RANGE, Layout
from .pki import FRONT_PROXY_CLIENT, ClusterPKI


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Added to the supervisor's environment."""
    files: dict[Path, str] = field(default_factory=dict)
    """Configuration files to write before starting."""


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubelm-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "kubelm-dev", "context": {"cluster": "kubelm-dev", "user": user}}],
        "current-context": "kubelm-dev",
    }


def etcd(layout: Layout) -> Component:
    p = layout.ports
    peer = f"http://{HOST}:{p.etcd_peer}"
    client = f"http://{HOST}:{p.etcd_client}"
    return Component(
        "etcd",
        [
            layout.binary("etcd"),
            "--name=devcluster",
            f"--data-dir={layout.data_dir('etcd')}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=devcluster={peer}",
            # A throwaway development store: durability across power loss is not worth the latency.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )


def apiserver(layout: Layout, pki: ClusterPKI) -> Component:
    return Component(
        "kube-apiserver",
        [
            layout.binary("kube-apiserver"),
            f"--etcd-servers=http://{HOST}:{layout.ports.etcd_client}",
            *_apiserver_address_flags(layout, pki),
            f"--secure-port={layout.ports.apiserver}",
            f"--cert-dir={layout.data_dir('kube-apiserver')}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # Aggregated APIs (a metrics server, for instance) authenticate the apiserver's proxy
            # through these; setting them also publishes the CA the other components look for.
            f"--requestheader-client-ca-file={pki.ca.cert}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
            f"--proxy-client-key-file={pki.front_proxy_client.key}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=0",
        ],
    )


def _apiserver_address_flags(layout: Layout, pki: ClusterPKI) -> list[str]:
    if not layout.real_node:
        return [
            f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            # The kubernetes Service would point at 127.0.0.1, which Endpoints reject; no pod runs
            # to reach the apiserver through it, so leave it without endpoints.
            "--endpoint-reconciler-type=none",
        ]
    return [
        # Pods reach the apiserver through the kubernetes Service, whose endpoint is the bridge address.
        "--bind-address=0.0.0.0",
        f"--advertise-address={NODE_IP}",
        "--endpoint-reconciler-type=lease",
        # The kubelet serves logs, exec and port-forward on the bridge address, with the apiserver's
        # client certificate.
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
        f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
    ]


def _component_kubeconfig_flags(path: Path) -> list[str]:
    return [
        f"--kubeconfig={path}",
        f"--authentication-kubeconfig={path}",
        f"--authorization-kubeconfig={path}",
    ]


def controller_manager(layout: Layout, pki: ClusterPKI, kubeconfig_path: Path) -> Component:
    return Component(
        "kube-controller-manager",
        [
            layout.binary("kube-controller-manager"),
            *_component_kubeconfig_flags(kubeconfig_path),
            f"--bind-address={HOST}",
            f"--secure-port={layout.ports.controller_manager}",
            f"--cert-dir={layout.data_dir('kube-controller-manager')}",
            # One instance: leader election only adds lease traffic and start-up delay.
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--profiling=false",
            "--v=0",
        ],
    )


def scheduler(layout: Layout, kubeconfig_path: Path) -> Component:
    return Component(
        "kube-scheduler",
        [
            layout.binary("kube-scheduler"),
            *_component_kubeconfig_flags(kubeconfig_path),
            f"--bind-address={HOST}",
            f"--secure-port={layout.ports.scheduler}",
            f"--cert-dir={layout.data_dir('kube-scheduler')}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=0",
        ],
    )


def redis(layout: Layout) -> Component:
    return Component(
        "redis",
        [
            "redis-server",
            "--bind", HOST,
            "--port", str(layout.ports.redis),
            "--dir", str(layout.data_dir("redis")),
            # Caches and progress only: nothing needs to survive a restart.
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ],
    )


def epmd(layout: Layout) -> Component:
    # Started here, in the foreground, so it stops with the cluster instead of outliving RabbitMQ
    # as the daemon that Erlang starts on its own would.
    return Component("epmd", ["epmd", "-port", str(layout.ports.epmd), "-address", HOST])


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def rabbitmq_env(layout: Layout) -> dict[str, str]:
    base = layout.data_dir("rabbitmq")
    p = layout.ports
    return {
        # HOME holds the Erlang cookie used by rabbitmqctl; keep it per cluster.
        "HOME": str(base),
        "RABBITMQ_NODENAME": f"kubelm-{p.amqp}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(p.amqp),
        "RABBITMQ_DIST_PORT": str(p.rabbitmq_dist),
        "ERL_EPMD_PORT": str(p.epmd),
        "ERL_EPMD_ADDRESS": HOST,
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        # Never start an epmd daemon of its own (it would outlive the cluster): use ours. The Erlang
        # schedulers must not spin while idle: on a developer machine they share cores with the
        # workers, whose decode steps they would slow down.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false +sbwt none +sbwtdcpu none +sbwtdio none",
    }


def rabbitmq(layout: Layout) -> Component:
    base = layout.data_dir("rabbitmq")
    p = layout.ports
    conf = "\n".join(
        [
            f"listeners.tcp.default = {HOST}:{p.amqp}",
            f"management.tcp.ip = {HOST}",
            f"management.tcp.port = {p.rabbitmq_management}",
            # Queue depth feeds the autoscaler: refresh the statistics every second, not every five.
            "collect_statistics_interval = 1000",
            "log.console = true",
            "log.console.level = warning",
            "log.file = false",
            "disk_free_limit.absolute = 50MB",
            "",
        ]
    )
    return Component(
        "rabbitmq",
        [RABBITMQ_SERVER],
        env=rabbitmq_env(layout),
        files={
            base / "rabbitmq.conf": conf,
            base / "enabled_plugins": "[rabbitmq_management].\n",
            base / "rabbitmq-env.conf": "",
            base / "advanced.config": "[].\n",
        },
    )
