"""Host-wide state a real node changes, and how `down` puts it back.

The kubelet, kube-proxy and the CNI plugins change things outside the cluster's
directory: sysctls, iptables chains, a bridge, mounts and cgroups. `prepare`
records what it will change before anything starts; `restore` undoes all of it
from that record, so it also works after the supervisor was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .layout import BRIDGE, NODE_IP, POD_CIDR
from .nodeconfig import RUN_DIR

# The kubelet sets the first four at start (its "kernel defaults"); the rest are for pod traffic.
SYSCTLS = (
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
"""Chains the kubelet, kube-proxy and the CNI plugins create; nothing else on a dev machine uses these names."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
RECORD = RUN_DIR / "host-state.json"


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def _write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        _sysctl_path(name).write_text(value)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True)


def prepare() -> None:
    """Records the host's state, then creates the bridge and sets what pod traffic needs."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if not RECORD.exists():  # a record left by a killed node holds the true original values
        RECORD.write_text(json.dumps({"sysctls": read_sysctls()}))
    # br_netfilter makes bridged pod-to-pod replies pass conntrack, so Service traffic between two
    # pods on the bridge is translated back.
    if shutil.which("modprobe"):
        _run("modprobe", "br_netfilter", check=False)
    _write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _write_sysctl("net.ipv4.ip_forward", "1")
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    prefix = POD_CIDR.split("/")[1]
    _run("ip", "addr", "replace", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")


def unmount_under(*roots: Path) -> None:
    """Unmounts every mount point below the given directories, deepest first."""
    tops = {str(r.resolve()) for r in roots}
    below = tuple(f"{top}/" for top in tops)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # spaces come as \040
            if point in tops or point.startswith(below):
                mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


def remove_chains() -> None:
    """Deletes the jumps into our chains from the built-in ones, then the chains themselves."""
    for command in ("iptables", "ip6tables"):  # kube-proxy programs both families
        for table in ("filter", "nat", "mangle"):
            _remove_chains(command, table)


def _remove_chains(command: str, table: str) -> None:
    listing = _run(command, "-t", table, "-S", check=False).stdout.splitlines()
    ours = {line.split()[1] for line in listing
            if line.startswith("-N ") and line.split()[1].startswith(CHAIN_PREFIXES)}
    for line in listing:
        parts = shlex.split(line)  # comments are quoted
        if parts[0] == "-A" and parts[1] not in ours and "-j" in parts and parts[parts.index("-j") + 1] in ours:
            _run(command, "-t", table, "-D", *parts[1:], check=False)
    for action in ("-F", "-X"):  # empty them all before deleting: they jump to each other
        for chain in ours:
            _run(command, "-t", table, action, chain, check=False)


def _kubepods_trees() -> list[Path]:
    """The top of the kubelet's pod cgroup tree in each controller (cgroup v1: one per controller)."""
    if not CGROUP_ROOT.exists():
        return []
    return [controller / name for controller in CGROUP_ROOT.iterdir() for name in ("kubepods", "kubepods.slice")
            if (controller / name).is_dir() and not (controller / name).is_symlink()]


def _pod_processes() -> list[int]:
    pids = []
    for top in _kubepods_trees():
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in procs.read_text().split()]
    return sorted(set(pids))


def kill_pod_processes(timeout: float = 30) -> None:
    """SIGKILL to every process in the kubelet's pod cgroups (containers whose shim is gone), and waits
    until they have left them: a cgroup with processes in it cannot be removed."""
    deadline = time.monotonic() + timeout
    while (pids := _pod_processes()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_cgroups() -> None:
    """The kubelet's cgroup trees (kubepods and its own), deepest first; empty once the pods are gone."""
    for top in _kubepods_trees():
        for directory, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def restore() -> None:
    """Puts the host back as `prepare` found it. Safe to call twice or without a prior prepare."""
    remove_chains()
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _run("ip", "link", "delete", BRIDGE, check=False)
    remove_cgroups()
    if RECORD.exists():
        for name, value in json.loads(RECORD.read_text())["sysctls"].items():
            _write_sysctl(name, value)
    unmount_under(RUN_DIR)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
