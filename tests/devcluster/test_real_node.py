"""The dev cluster's real node: containerd, kubelet, kube-proxy and CoreDNS running kubelm's own images.

One real node per machine: the module starts one (`kubelm-dev up --node real`) and every test here
shares it; the last test takes it down and checks that the host is as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubelm_devcluster import cli, hostnet, nodeconfig
from kubelm_devcluster.layout import BRIDGE, NODE_NAME
from kubelm_devcluster.supervisor import marked_processes
from support import ClusterEnv, eventually

pytestmark = [pytest.mark.slow]

RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class RealNode:
    root: Path
    env: ClusterEnv
    images: dict[str, str]
    host_before: dict[str, str]

    def image(self, repository: str) -> str:
        return next(ref for ref in self.images if ref.rsplit(":", 1)[0] == repository)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    if os.geteuid() != 0:
        pytest.skip("a real node needs root")
    root = tmp_path_factory.mktemp("realnode")
    before = hostnet.read_sysctls()
    # The first start imports the images into the node's store: minutes for the runtime image.
    started = cli.up(root, timeout=1800, parent_pid=os.getpid(), real_node=True)
    env = started.env()
    try:
        yield RealNode(root, ClusterEnv(env["KUBECONFIG"], "", "", "", str(started.layout.bin_dir / "kubectl")),
                       started.layout.images, before)
    finally:
        cli.down(root)


@pytest.fixture
def namespace(node: RealNode) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    node.env.kubectl("create", "namespace", name)
    yield name
    node.env.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(node: RealNode, namespace: str, *objects: dict) -> None:
    node.env.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                            "items": list(objects)}))


def pod_phase(node: RealNode, namespace: str, name: str) -> str:
    result = node.env.kubectl("get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}", check=False)
    return result.stdout


def python_pod(name: str, image: str, script: str, **spec: object) -> dict:
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
    def finished() -> bool:
        return pod_phase(node, namespace, name) in ("Succeeded", "Failed")

    eventually(finished, timeout, 0.5, f"pod {name} finished")
    logs = node.env.kubectl("logs", "-n", namespace, name).stdout
    assert pod_phase(node, namespace, name) == "Succeeded", logs
    return logs


def test_the_node_is_ready_on_containerd_2(node: RealNode) -> None:
    info = json.loads(node.env.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert info["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    assert {"type": "InternalIP", "address": "10.244.0.1"} in info["status"]["addresses"]
    ready = next(c for c in info["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert not info["spec"].get("taints"), info["spec"]


def test_the_runtime_image_runs_under_the_restricted_security_context(node: RealNode, namespace: str) -> None:
    script = """
        import os, pathlib, torch, transformers, kubelm_runtime
        cache = pathlib.Path(os.environ["HF_HOME"])
        cache.mkdir(parents=True)
        (cache / "probe").write_text("ok")
        try:
            pathlib.Path("/opt/kubelm/probe").write_text("no")
            print("root filesystem writable")
        except OSError as e:
            print("root filesystem read-only:", e.errno)
        product = float(torch.ones(2, 2).matmul(torch.ones(2, 2)).sum())
        print("uid", os.getuid(), "torch", torch.__version__, "matmul", product)
    """
    apply(node, namespace, python_pod("runtime", node.image("kubelm/runtime"), script))
    logs = wait_succeeded(node, namespace, "runtime")
    assert "root filesystem read-only: 30" in logs  # EROFS
    assert "uid 10001 torch 2." in logs and "matmul 8.0" in logs


def test_the_operator_image_starts_its_command(node: RealNode, namespace: str) -> None:
    pod = python_pod("operator", node.image("kubelm/operator"),
                     "import kopf, kubelm_operator, kubelm_contract; print('operator modules import')")
    apply(node, namespace, pod)
    assert "operator modules import" in wait_succeeded(node, namespace, "operator")


def test_a_deployment_becomes_ready_and_answers_through_its_service_by_name(node: RealNode, namespace: str) -> None:
    image = node.image("kubelm/runtime")
    labels = {"app": "web"}
    server = """
        import http.server
        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"hello from " + self.server.server_name.encode()
                self.send_response(200); self.end_headers(); self.wfile.write(body)
        http.server.HTTPServer(("", 8080), Hello).serve_forever()
    """
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "web",
                        "image": image,
                        "command": ["python", "-c", textwrap.dedent(server)],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                        "securityContext": {**RESTRICTED, "runAsUser": 10001},
                    }],
                },
            },
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}}
    apply(node, namespace, deployment, service)
    node.env.kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=300s")
    client = f"""
        import urllib.request
        print(urllib.request.urlopen("http://web.{namespace}.svc.cluster.local/", timeout=10).read().decode())
    """
    apply(node, namespace, python_pod("client", image, client))
    assert "hello from" in wait_succeeded(node, namespace, "client")
    # exec reaches the container through the kubelet, as logs did.
    pod = node.env.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "name").stdout.split()[0]
    hostname = node.env.kubectl("exec", "-n", namespace, pod, "--", "python", "-c",
                                "import socket; print(socket.gethostname())").stdout.strip()
    assert hostname == pod.split("/")[1]


def test_pods_reach_the_apiserver_through_the_kubernetes_service(node: RealNode, namespace: str) -> None:
    script = """
        import json, ssl, urllib.request
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        context = ssl.create_default_context(cafile=sa + "/ca.crt")
        request = urllib.request.Request("https://kubernetes.default.svc/version",
                                         headers={"Authorization": "Bearer " + open(sa + "/token").read()})
        print("apiserver", json.load(urllib.request.urlopen(request, context=context, timeout=10))["gitVersion"])
    """
    apply(node, namespace, python_pod("apiclient", node.image("kubelm/operator"), script))
    assert "apiserver v1." in wait_succeeded(node, namespace, "apiclient")


def test_down_stops_everything_and_puts_the_host_back(node: RealNode) -> None:
    cli.down(node.root)
    assert marked_processes(node.root) == []
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
    for command in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = subprocess.run([command, "-t", table, "-S"], capture_output=True, text=True).stdout
            assert not any(prefix in rules for prefix in hostnet.CHAIN_PREFIXES), (command, table, rules)
    assert hostnet.read_sysctls() == node.host_before
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(nodeconfig.RUN_DIR) not in mounts and str(node.root) not in mounts
    assert not nodeconfig.RUN_DIR.exists()
    assert not any((hostnet.CGROUP_ROOT / c / "kubepods").exists() for c in ("cpu", "memory", "pids"))
