"""The dev cluster's real node: containerd, kubelet, kube-proxy and CoreDNS running kubelm's own images.

The module starts a real node (`kubelm-dev up --node real`) that every test here shares; the last
test takes it down and checks that the host is as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from kubelm_devcluster import cli, hostnet, nodeconfig
from kubelm_devcluster.layout import BRIDGE, NODE_NAME, Layout
from kubelm_devcluster.supervisor import marked_processes
from node_support import RESTRICTED, RealNode, answers, apply, deployment, python_pod, wait_succeeded
from support import ClusterEnv, eventually

pytestmark = [pytest.mark.slow]


def dev_node_only(node: RealNode) -> None:
    if not node.dev_node:
        pytest.skip("checks the dev cluster's own node")


def test_the_node_is_ready_on_containerd_2(real_node: RealNode) -> None:
    dev_node_only(real_node)
    info = json.loads(real_node.env.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert info["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    assert {"type": "InternalIP", "address": "10.244.0.1"} in info["status"]["addresses"]
    ready = next(c for c in info["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", ready
    assert not info["spec"].get("taints"), info["spec"]
    # The image store keeps what the node runs: no image-ID reference of an older build holds its layers.
    layout = Layout.from_json(json.loads((real_node.root / "state.json").read_text())["layout"])
    assert layout.node_bin_dir is not None
    listing = subprocess.run([str(layout.node_bin_dir / "ctr"), "--address", str(nodeconfig.CONTAINERD_SOCKET),
                              "--namespace", nodeconfig.CONTAINERD_NAMESPACE, "images", "ls"],
                             capture_output=True, text=True, check=True).stdout
    assert nodeconfig.normalized(real_node.image("kubelm/runtime")) in listing
    assert nodeconfig.unnamed_images(listing) == []


def test_the_runtime_image_runs_under_the_restricted_security_context(real_node: RealNode, node_namespace: str) -> None:
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
    apply(real_node, node_namespace, python_pod("runtime", real_node.image("kubelm/runtime"), script))
    logs = wait_succeeded(real_node, node_namespace, "runtime")
    assert "root filesystem read-only: 30" in logs  # EROFS
    assert "uid 10001 torch 2." in logs and "matmul 8.0" in logs


def test_the_operator_image_starts_its_command(real_node: RealNode, node_namespace: str) -> None:
    pod = python_pod("operator", real_node.image("kubelm/operator"),
                     "import kopf, kubelm_operator, kubelm_contract; print('operator modules import')")
    apply(real_node, node_namespace, pod)
    assert "operator modules import" in wait_succeeded(real_node, node_namespace, "operator")


def test_a_deployment_becomes_ready_and_answers_through_its_service_by_name(
        real_node: RealNode, node_namespace: str) -> None:
    image = real_node.image("kubelm/runtime")
    server = """
        import http.server
        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"hello from " + self.server.server_name.encode()
                self.send_response(200); self.end_headers(); self.wfile.write(body)
        http.server.HTTPServer(("", 8080), Hello).serve_forever()
    """
    web = deployment("web", {
        "name": "web",
        "image": image,
        "command": ["python", "-c", textwrap.dedent(server)],
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
        "securityContext": {**RESTRICTED, "runAsUser": 10001},
    })
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    apply(real_node, node_namespace, web, service)
    real_node.env.kubectl("rollout", "status", "-n", node_namespace, "deployment/web", "--timeout=300s")
    if real_node.dev_node:
        # kube-proxy programs a new Service a moment after its endpoints are ready; the host goes
        # through the same rules as pods, so the first answer here says the Service is in place.
        cluster_ip = real_node.env.kubectl("get", "service", "-n", node_namespace, "web",
                                           "-o", "jsonpath={.spec.clusterIP}").stdout
        eventually(lambda: answers(f"http://{cluster_ip}/"), 120, 0.5, "the Service answers")
    client = f"""
        import urllib.request
        print(urllib.request.urlopen("http://web.{node_namespace}.svc.cluster.local/", timeout=10).read().decode())
    """
    apply(real_node, node_namespace, python_pod("client", image, client))
    assert "hello from" in wait_succeeded(real_node, node_namespace, "client")
    # exec reaches the container through the kubelet, as logs did.
    pod = real_node.env.kubectl("get", "pods", "-n", node_namespace, "-l", "app=web", "-o", "name").stdout.split()[0]
    hostname = real_node.env.kubectl("exec", "-n", node_namespace, pod, "--", "python", "-c",
                                "import socket; print(socket.gethostname())").stdout.strip()
    assert hostname == pod.split("/")[1]


def test_pods_reach_the_apiserver_through_the_kubernetes_service(real_node: RealNode, node_namespace: str) -> None:
    script = """
        import json, ssl, urllib.request
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        context = ssl.create_default_context(cafile=sa + "/ca.crt")
        request = urllib.request.Request("https://kubernetes.default.svc/version",
                                         headers={"Authorization": "Bearer " + open(sa + "/token").read()})
        print("apiserver", json.load(urllib.request.urlopen(request, context=context, timeout=10))["gitVersion"])
    """
    apply(real_node, node_namespace, python_pod("apiclient", real_node.image("kubelm/operator"), script))
    assert "apiserver v1." in wait_succeeded(real_node, node_namespace, "apiclient")


def assert_host_put_back(root: Path, sysctls_before: dict[str, str]) -> None:
    assert marked_processes(root) == []
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
    for command in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = subprocess.run([command, "-t", table, "-S"], capture_output=True, text=True).stdout
            assert not any(prefix in rules for prefix in hostnet.CHAIN_PREFIXES), (command, table, rules)
    assert hostnet.read_sysctls() == sysctls_before
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(nodeconfig.RUN_DIR) not in mounts and str(root) not in mounts
    assert not nodeconfig.RUN_DIR.exists()
    assert not any((hostnet.CGROUP_ROOT / c / "kubepods").exists() for c in ("cpu", "memory", "pids"))


def test_down_stops_everything_and_puts_the_host_back(real_node: RealNode) -> None:
    dev_node_only(real_node)
    cli.down(real_node.root)
    assert_host_put_back(real_node.root, real_node.host_before)


def test_down_after_a_killed_supervisor_also_ends_the_pods(real_node: RealNode, tmp_path: Path) -> None:
    """Killed, the supervisor takes containerd and the kubelet with it, but containers outlive their
    shims: down must find and end them, and still put the host back."""
    dev_node_only(real_node)  # runs after the module's node is down: one real node at a time
    root = tmp_path / "killed"
    cluster = cli.up(root, timeout=600, parent_pid=os.getpid(), real_node=True)
    env = ClusterEnv(str(cluster.layout.kubeconfig), "", "", "", str(cluster.layout.bin_dir / "kubectl"))
    try:
        pause = next(ref for ref in cluster.layout.images if ref.startswith("kubelm/pause:"))
        env.kubectl("run", "sleeper", f"--image={pause}", "--restart=Never")
        env.kubectl("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s")
        sleepers = pod_processes()
        assert sleepers
        state = json.loads((root / "state.json").read_text())
        os.kill(state["supervisor_pid"], signal.SIGKILL)
        containerd = state["components"]["containerd"]
        eventually(lambda: not os.path.exists(f"/proc/{containerd}"), 30, 0.2, "containerd gone with the supervisor")
        assert any(alive(pid) for pid in sleepers)  # the container outlived it
    finally:
        cli.down(root)
    assert not any(alive(pid) for pid in sleepers)
    assert_host_put_back(root, real_node.host_before)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pod_processes() -> list[int]:
    return [int(pid) for procs in hostnet.CGROUP_ROOT.glob("pids/kubepods/**/cgroup.procs")
            for pid in procs.read_text().split()]

