"""kubelm-dev: start, stop and inspect the local dev cluster.

  kubelm-dev up       start (or find running) and wait until every component is ready
  kubelm-dev down     stop everything; no process is left behind
  kubelm-dev status   components, pids and URLs; exit 1 when not running
  kubelm-dev env      shell exports for KUBECONFIG and the Redis/RabbitMQ URLs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubelm_contract import env as contract_env

from . import hostnet
from .layout import DEFAULT_DIR, IMAGES_SCRIPT, SCRIPTS_DIR, Layout, Ports, read_state
from .nodeconfig import CONTAINERD_SOCKET, STORE_DIR, node_paths_of
from .probes import write_json
from .supervisor import group_members, kill_group_members, kill_marked, marked_processes

BUILD_SCRIPT = SCRIPTS_DIR / "build-control-plane.sh"


class DevClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cluster:
    layout: Layout
    ready_seconds: float

    def env(self) -> dict[str, str]:
        return {
            contract_env.KUBECONFIG: str(self.layout.kubeconfig),
            contract_env.REDIS_URL: self.layout.redis_url,
            contract_env.AMQP_URL: self.layout.amqp_url,
            contract_env.RABBITMQ_API_URL: self.layout.rabbitmq_api_url,
            "KUBELM_DEV_BIN_DIR": str(self.layout.bin_dir),
        }


def binaries_dir() -> Path:
    """KUBELM_DEV_BIN_DIR when set, otherwise the cached build (built on first use)."""
    if explicit := os.environ.get("KUBELM_DEV_BIN_DIR"):
        return Path(explicit)
    return Path(_last_line(BUILD_SCRIPT.name))


def _last_line(script: str) -> str:
    out = subprocess.run(["bash", str(SCRIPTS_DIR / script)], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def node_binaries_dir() -> Path:
    """The real node's programs (built on first use, cached by version)."""
    return Path(_last_line("build-node.sh"))


def node_images() -> tuple[str, ...]:
    """kubelm's images, the dev overlay's and the pause image (built on first use, tagged by content)."""
    return tuple(_last_line(IMAGES_SCRIPT.name).split())


def _real_node_running() -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(CONTAINERD_SOCKET))
        except OSError:
            return False
    return True


def _supervisor_alive(state: dict[str, object]) -> bool:
    pid = state.get("supervisor_pid")
    return isinstance(pid, int) and bool(group_members(pid))


def up(root: Path = DEFAULT_DIR, timeout: float = 240, parent_pid: int | None = None,
       real_node: bool = False) -> Cluster:
    root = root.resolve()
    state = read_state(root)
    if state and state.get("status") == "ready" and _supervisor_alive(state):
        running = Layout.from_json(state["layout"])  # type: ignore[arg-type]
        if running.real_node == real_node:
            return Cluster(running, float(state.get("ready_seconds", 0)))  # type: ignore[arg-type]
        # Running with the other kind of node: start again with the one asked for.
    if state and _supervisor_alive(state):
        down(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if real_node:
        if _real_node_running():
            raise DevClusterError("a real node already runs on this machine (one per machine): "
                                  "take its cluster down first (kubelm-dev --dir DIR down)")
        layout = Layout(root, binaries_dir(), Ports.allocate(), node_binaries_dir(), node_images())
    else:
        layout = Layout(root, binaries_dir(), Ports.allocate())
    write_json(root / "state.json", {"status": "starting", "layout": layout.to_json()})
    (root / "logs").mkdir()
    argv = [sys.executable, "-m", "kubelm_devcluster.supervisor", "--dir", str(root)]
    if parent_pid:
        argv += ["--parent-pid", str(parent_pid)]
    with open(root / "logs" / "supervisor.log", "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(root) or {}
        if state.get("status") == "ready":
            return Cluster(layout, float(state.get("ready_seconds", 0)))  # type: ignore[arg-type]
        if process.poll() is not None or state.get("status") == "failed":
            process.wait()
            raise DevClusterError(f"dev cluster failed to start: {state.get('error')}\n"
                                  f"logs: {root / 'logs'}")
        time.sleep(0.2)
    down(root)
    raise DevClusterError(f"dev cluster not ready after {timeout:.0f}s; logs: {root / 'logs'}")


def down(root: Path = DEFAULT_DIR, timeout: float = 60) -> None:
    """Stops the supervisor gracefully, then kills whatever is left in its process group."""
    state = read_state(root.resolve())
    pgid = state.get("supervisor_pid") if state else None
    if not state or not isinstance(pgid, int):
        return
    if pgid in group_members(pgid):
        os.kill(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    # Whatever is left (grandchildren of a killed supervisor, daemons that left the group) goes now.
    kill_group_members(pgid)
    kill_marked(root.resolve())
    while group_members(pgid) or marked_processes(root.resolve()):
        time.sleep(0.05)
    layout = state.get("layout")
    if isinstance(layout, dict) and layout.get("node_bin_dir"):
        # After a clean stop there is nothing left to do; after a killed supervisor, the containers
        # outlived their shims and the host still holds the node's network and mounts.
        hostnet.kill_pod_processes()
        hostnet.unmount_under(node_paths_of(root.resolve()).root)
        hostnet.restore()


def purge(root: Path = DEFAULT_DIR) -> list[Path]:
    """Deletes what a stopped cluster keeps on disk: its state directory (etcd's data, certificates, logs)
    and, when it ran the real node, the node's store (containerd's images and snapshots), so that the next
    `up` starts from nothing. Returns what it deleted. A directory that holds no dev cluster's state is
    left alone, whatever `--dir` said."""
    root = root.resolve()
    state = read_state(root)
    if not state:
        return []
    if _supervisor_alive(state):
        raise DevClusterError(f"the dev cluster in {root} is running: stop it first (kubelm-dev down)")
    removed = []
    layout = state.get("layout")
    if isinstance(layout, dict) and Layout.from_json(layout).real_node and STORE_DIR.exists():
        hostnet.unmount_under(STORE_DIR)
        shutil.rmtree(STORE_DIR)
        removed.append(STORE_DIR)
    hostnet.unmount_under(root)
    shutil.rmtree(root)
    return [*removed, root]


def status(root: Path = DEFAULT_DIR) -> tuple[bool, str]:
    state = read_state(root.resolve())
    if not state:
        return False, f"no dev cluster in {root}"
    alive = _supervisor_alive(state)
    lines = [f"status: {state.get('status')}{'' if alive else ' (supervisor not running)'}"]
    components = state.get("components") or {}
    assert isinstance(components, dict)
    for name, pid in components.items():
        running = os.path.exists(f"/proc/{pid}")
        lines.append(f"  {name:<24} pid {pid:<8} {'running' if running else 'gone'}")
    if alive and state.get("status") == "ready":
        layout = Layout.from_json(state["layout"])  # type: ignore[arg-type]
        lines += [f"  {k}={v}" for k, v in Cluster(layout, 0).env().items()]
    return alive and state.get("status") == "ready", "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubelm-dev", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start and wait until ready")
    up_parser.add_argument("--timeout", type=float,
                           help="seconds to wait (default 240; 1800 with a real node, whose first start imports "
                                "the images)")
    up_parser.add_argument("--node", choices=("heartbeat", "real"), default="heartbeat",
                           help="heartbeat: a Node object kept Ready that runs no pods (default); "
                                "real: containerd + kubelet + kube-proxy + CoreDNS running kubelm's images "
                                "(root, one per machine; builds them on first use)")
    down_parser = sub.add_parser("down", help="stop everything")
    down_parser.add_argument("--purge", action="store_true",
                             help="then delete the cluster's state directory and, after a real node, its image "
                                  f"store ({STORE_DIR}): the next up starts from nothing (and imports the images "
                                  "again; the built images stay cached)")
    sub.add_parser("status", help="show components")
    sub.add_parser("env", help="print shell exports")
    args = parser.parse_args(argv)

    if args.command == "up":
        try:
            real_node = args.node == "real"
            cluster = up(args.dir, args.timeout or (1800 if real_node else 240), real_node=real_node)
        except DevClusterError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"dev cluster ready in {cluster.ready_seconds:.1f}s; use it with: eval \"$(kubelm-dev env)\"")
        return 0
    if args.command == "down":
        down(args.dir)
        try:
            deleted = purge(args.dir) if args.purge else []
        except DevClusterError as e:  # down could not stop it
            print(e, file=sys.stderr)
            return 1
        for path in deleted:
            print(f"deleted {path}")
        return 0
    if args.command == "status":
        ok, text = status(args.dir)
        print(text)
        return 0 if ok else 1
    state = read_state(args.dir.resolve())
    if not state or state.get("status") != "ready":
        print("dev cluster is not running; start it with: kubelm-dev up", file=sys.stderr)
        return 1
    for key, value in Cluster(Layout.from_json(state["layout"]), 0).env().items():  # type: ignore[arg-type]
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
