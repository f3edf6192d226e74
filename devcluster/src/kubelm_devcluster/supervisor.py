"""The dev cluster supervisor: one detached process that owns every component.

It starts the components in dependency order, waits for each to be really ready,
keeps the Node's heartbeat, and on SIGTERM stops everything in reverse order.
Its children die with it (parent-death signal), and it leads its own process
group so `kubelm-dev down` can clean up even after it was killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from . import components, hostnet, node, nodeconfig
from .layout import IMAGES_SCRIPT, NODE_NAME, Layout, read_state
from .pki import ClusterPKI, create_pki
from .probes import KubeClient, http_get, insecure_tls, redis_ping, tcp_open, wait_for, write_json

HEARTBEAT_SECONDS = 10
STOP_GRACE_SECONDS = 15
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ComponentDied(RuntimeError):
    pass


class StopRequested(RuntimeError):
    pass


class Supervisor:
    def __init__(self, layout: Layout, parent_pid: int | None = None):
        self.layout = layout
        self.parent_pid = parent_pid
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()
        self.state: dict[str, object] = dict(read_state(layout.root) or {})
        self.pki: ClusterPKI | None = None
        self.kube: KubeClient | None = None

    # -- state file -----------------------------------------------------------------------------
    def _publish(self, **fields: object) -> None:
        self.state.update(fields)
        self.state["supervisor_pid"] = os.getpid()
        self.state["components"] = {n: p.pid for n, p in self.processes.items()}
        write_json(self.layout.state_file, self.state)

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, component: components.Component) -> None:
        for path, text in component.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.layout.data_dir(component.name).mkdir(parents=True, exist_ok=True)
        with open(self.layout.logs_dir / f"{component.name}.log", "ab") as log:
            self.processes[component.name] = subprocess.Popen(
                component.argv,
                env={**os.environ, **component.env, MARKER_VARIABLE: str(self.layout.root)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self._publish()

    def check_alive(self) -> None:
        if self.stopping.is_set():
            raise StopRequested("stop requested while starting")
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.layout.logs_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise ComponentDied(f"{name} exited with {process.returncode}; log tail:\n{tail}")

    def wait(self, what: str, check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        wait_for(what, check, timeout, alive=self.check_alive)

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        started = time.monotonic()
        layout, ports = self.layout, self.layout.ports
        layout.logs_dir.mkdir(parents=True, exist_ok=True)
        pki = self.pki = create_pki(layout.pki_dir)
        self._write_kubeconfigs(pki)
        if layout.real_node:
            hostnet.prepare()

        # Independent pieces first, so RabbitMQ's slow boot overlaps the control plane's.
        self.spawn(components.redis(layout))
        self.spawn(components.etcd(layout))
        self.spawn(components.epmd(layout))
        self.wait("epmd", lambda: tcp_open(ports.epmd), 10)
        self.spawn(components.rabbitmq(layout))

        self.wait("etcd", lambda: http_get(f"http://127.0.0.1:{ports.etcd_client}/health")[0] == 200)
        self.spawn(components.apiserver(layout, pki))
        kube = self.kube = KubeClient(layout.apiserver_url, pki)
        self.wait("kube-apiserver /readyz", kube.readyz, 120)
        self.spawn(components.controller_manager(layout, pki, layout.root / "controller-manager.kubeconfig"))
        self.spawn(components.scheduler(layout, layout.root / "scheduler.kubeconfig"))
        if not layout.real_node:
            self._register_node()

        tls = insecure_tls()
        self.wait("kube-controller-manager", lambda: http_get(
            f"https://127.0.0.1:{ports.controller_manager}/healthz", tls)[0] == 200)
        self.wait("kube-scheduler", lambda: http_get(
            f"https://127.0.0.1:{ports.scheduler}/healthz", tls)[0] == 200)
        self.wait("default ServiceAccount", lambda: kube.request(
            "GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200)
        if layout.real_node:
            self._start_real_node(pki)
        self.wait("node Ready", self._node_ready, 120)
        self.wait("redis", lambda: redis_ping(ports.redis))
        self.wait("rabbitmq", lambda: http_get(
            f"{layout.rabbitmq_api_url}/api/health/checks/alarms")[0] == 200 and tcp_open(ports.amqp), 120)
        self._publish(status="ready", ready_seconds=round(time.monotonic() - started, 2))

    def _write_kubeconfigs(self, pki: ClusterPKI) -> None:
        server = self.layout.apiserver_url
        for path, pair, user in (
            (self.layout.kubeconfig, pki.admin, "kubelm-admin"),
            (self.layout.root / "controller-manager.kubeconfig", pki.controller_manager, "controller-manager"),
            (self.layout.root / "scheduler.kubeconfig", pki.scheduler, "scheduler"),
            (self.layout.root / "kubelet.kubeconfig", pki.kubelet_client, "kubelet"),
            (self.layout.root / "kube-proxy.kubeconfig", pki.kube_proxy, "kube-proxy"),
            (self.layout.root / "coredns.kubeconfig", pki.coredns, "coredns"),
        ):
            path.write_text(yaml.safe_dump(components.kubeconfig(server, pki.ca.cert, pair.cert, pair.key, user)))
            path.chmod(0o600)

    # -- real node ------------------------------------------------------------------------------
    def _start_real_node(self, pki: ClusterPKI) -> None:
        assert self.kube
        layout, root = self.layout, self.layout.root
        for obj in nodeconfig.node_rbac():
            path = f"/apis/rbac.authorization.k8s.io/v1/{str(obj['kind']).lower()}s"
            status, payload = self.kube.request("POST", path, obj)
            if status not in (201, 409):
                raise RuntimeError(f"creating {obj['kind']}: {status} {payload.get('message')}")
        self.spawn(nodeconfig.containerd(layout, nodeconfig.sandbox_image(layout.images)))
        self.wait("containerd", lambda: nodeconfig.CONTAINERD_SOCKET.is_socket()
                  and self._ctr("version").returncode == 0)
        self._import_images()
        self.spawn(nodeconfig.kubelet(layout, pki, root / "kubelet.kubeconfig"))
        self.spawn(nodeconfig.kube_proxy(layout, root / "kube-proxy.kubeconfig"))
        self.spawn(nodeconfig.coredns(layout, root / "coredns.kubeconfig"))
        self.wait("kubelet /healthz", lambda: http_get(
            f"http://127.0.0.1:{layout.ports.kubelet_healthz}/healthz")[0] == 200, 120)
        self.wait("kube-proxy /healthz", lambda: http_get(
            f"http://127.0.0.1:{layout.ports.kube_proxy_healthz}/healthz")[0] == 200, 120)
        self.wait("coredns /ready", lambda: http_get(
            f"http://127.0.0.1:{nodeconfig.COREDNS_READY_PORT}/ready")[0] == 200, 120)

    def _ctr_argv(self, *args: str) -> list[str]:
        assert self.layout.node_bin_dir
        return [str(self.layout.node_bin_dir / "ctr"), "--address", str(nodeconfig.CONTAINERD_SOCKET),
                "--namespace", nodeconfig.CONTAINERD_NAMESPACE, *args]

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._ctr_argv(*args), text=True, capture_output=True, timeout=1800)

    def _import_images(self) -> None:
        """Imports each image the node's store lacks, straight from the image build (no archive on
        disk), and drops older builds of the same image, their image-ID references included (the
        runtime image is ~6 GiB: a few left behind fill a disk)."""
        present = set(self._ctr("images", "ls", "--quiet").stdout.split())
        for ref in self.layout.images:
            if nodeconfig.normalized(ref) in present:
                continue
            repository = nodeconfig.repository(nodeconfig.normalized(ref))
            stale = [p for p in present if nodeconfig.repository(p) == repository]
            if stale:
                self._ctr("images", "rm", *stale)
            self._drop_unnamed_images()
            print(f"importing {ref}", flush=True)
            save = subprocess.Popen(["bash", str(IMAGES_SCRIPT), "save", ref], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            assert save.stdout
            imported = subprocess.run(self._ctr_argv("images", "import", "--snapshotter", "overlayfs", "-"),
                                      stdin=save.stdout, capture_output=True, text=True, timeout=1800)
            save.stdout.close()
            saved = save.wait()
            if saved != 0 or imported.returncode != 0:
                reason = save.stderr.read().decode(errors="replace") if save.stderr else ""
                raise RuntimeError(f"importing {ref}: {reason.strip()} {imported.stderr.strip()}")

    def _drop_unnamed_images(self) -> None:
        unnamed = nodeconfig.unnamed_images(self._ctr("images", "ls").stdout)
        if unnamed:  # --sync: the space is free before the next import needs it
            self._ctr("images", "rm", "--sync", *unnamed)

    def _remove_pods(self) -> None:
        """The kubelet is stopped: remove every pod sandbox so no container, mount or veth outlives the node."""
        assert self.layout.node_bin_dir
        subprocess.run([str(self.layout.node_bin_dir / "crictl"), "--runtime-endpoint",
                        f"unix://{nodeconfig.CONTAINERD_SOCKET}", "rmp", "--all", "--force"],
                       capture_output=True, timeout=120)

    # -- node -----------------------------------------------------------------------------------
    def _register_node(self) -> None:
        assert self.kube
        self.version = self.kube.version()
        self.ready_since = node.now()
        status, payload = self.kube.request("POST", "/api/v1/nodes", node.node_object(NODE_NAME))
        if status not in (201, 409):
            raise RuntimeError(f"creating node {NODE_NAME}: {status} {payload}")
        self._heartbeat()

    def _heartbeat(self) -> None:
        assert self.kube
        status, payload = self.kube.request(
            "PATCH", f"/api/v1/nodes/{NODE_NAME}/status",
            node.node_status(self.version, self.ready_since), "application/merge-patch+json")
        if status != 200:
            raise RuntimeError(f"node status heartbeat: {status} {payload.get('message')}")
        lease = node.lease_object(NODE_NAME)
        path = f"/apis/coordination.k8s.io/v1/namespaces/{node.NODE_LEASE_NAMESPACE}/leases"
        status, _ = self.kube.request("PATCH", f"{path}/{NODE_NAME}", {"spec": lease["spec"]},
                                      "application/merge-patch+json")
        if status == 404:
            self.kube.request("POST", path, lease)

    def _node_ready(self) -> bool:
        assert self.kube
        status, payload = self.kube.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        conditions = payload.get("status", {}).get("conditions", []) if status == 200 else []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def run(self) -> None:
        """Heartbeats until asked to stop or until the parent that asked for the cluster is gone."""
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while not self.stopping.wait(1):
            if self.parent_pid and not _pid_alive(self.parent_pid):
                return
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ComponentDied(f"{name} exited with {process.returncode}")
            if not self.layout.real_node and time.monotonic() >= next_beat:
                try:
                    self._heartbeat()
                except (OSError, RuntimeError) as e:
                    print(f"heartbeat failed: {e}", file=sys.stderr, flush=True)
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    # -- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._publish(status="stopping")
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if name == "containerd" and process.poll() is None:
                self._remove_pods()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        kill_group_members(os.getpgid(0), exclude=os.getpid())
        self.processes.clear()
        if self.layout.real_node:
            hostnet.unmount_under(nodeconfig.node_paths(self.layout).root)
            hostnet.restore()
        self._publish(status="failed" if self.state.get("status") == "failed" else "stopped")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MARKER_VARIABLE = "KUBELM_DEVCLUSTER"
"""Set in every component's environment; descendants inherit it, even daemons that leave the group."""


def _processes() -> Iterator[tuple[int, str, int]]:
    """(pid, state, process group) of every process, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry.name), fields[0], int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (zombies excluded)."""
    return [pid for pid, state, group in _processes() if group == pgid and state != "Z"]


def marked_processes(root: Path) -> list[int]:
    """Live processes started for the cluster in `root`, wherever they moved (by environment marker)."""
    marker = f"{MARKER_VARIABLE}={root}".encode() + b"\0"
    found = []
    for pid, state, _ in _processes():
        if state == "Z" or pid == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def kill_group_members(pgid: int, exclude: int | None = None) -> None:
    for pid in group_members(pgid):
        if pid != exclude:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_marked(root: Path) -> None:
    for pid in marked_processes(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubelm_devcluster.supervisor")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    state = read_state(args.dir)
    if not state:
        print(f"no state file in {args.dir}", file=sys.stderr)
        return 2
    layout = Layout.from_json(state["layout"])  # type: ignore[arg-type]
    supervisor = Supervisor(layout, args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    try:
        supervisor.start()
        supervisor.run()
        return 0
    except Exception as e:
        supervisor._publish(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        supervisor.stop()


if __name__ == "__main__":
    sys.exit(main())
