"""kubelm-dev up/down as a user runs them: real processes, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubelm_devcluster.supervisor import group_members, marked_processes
from support import eventually

pytestmark = [pytest.mark.slow]


def kubelm_dev(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubelm_devcluster.cli", "--dir", str(root), *args],
                          capture_output=True, text=True, timeout=300)


def kubelm(kubeconfig: str, *args: str) -> tuple[int, str]:
    """The `kubelm` command's exit code and stderr."""
    result = subprocess.run([str(Path(sys.executable).parent / "kubelm"), *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "KUBECONFIG": kubeconfig})
    return result.returncode, result.stderr


def _state(root: Path) -> dict:
    return json.loads((root / "state.json").read_text())


def test_up_is_idempotent_and_down_leaves_no_process(tmp_path: Path) -> None:
    root = tmp_path / "dc"
    first = kubelm_dev(root, "up")
    assert first.returncode == 0, first.stderr
    state = _state(root)
    pgid = state["supervisor_pid"]
    pids = set(state["components"].values())
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "redis", "rabbitmq",
            "epmd"} <= set(state["components"])
    assert pids <= set(group_members(pgid))

    again = kubelm_dev(root, "up")
    assert again.returncode == 0 and _state(root)["supervisor_pid"] == pgid

    status = kubelm_dev(root, "status")
    assert status.returncode == 0 and "kube-apiserver" in status.stdout
    env = kubelm_dev(root, "env").stdout
    assert "export KUBECONFIG=" in env and "export KUBELM_AMQP_URL=amqp://" in env
    # A fresh cluster has no kubelm API yet: the kubelm command says so in one line (exit 5), and once
    # the cluster is down, that it cannot be reached (exit 3). This is the one cluster without the CRDs.
    kubeconfig = str(root / "kubeconfig")
    assert kubelm(kubeconfig, "status") == (5, "error: the kubelm API (kubelm.io/v1alpha1) is not installed in "
                                               "this cluster: install it with `kubectl apply --server-side -k "
                                               "manifests/install` or the Helm chart\n")

    assert kubelm_dev(root, "down").returncode == 0
    code, said = kubelm(kubeconfig, "status")
    assert code == 3 and said.startswith("error: cannot reach the cluster at https://127.0.0.1:") and \
        said.count("\n") == 1, said
    assert group_members(pgid) == []
    assert marked_processes(root) == []
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in pids)
    assert kubelm_dev(root, "status").returncode == 1
    assert kubelm_dev(root, "down", "--purge").stdout == f"deleted {root.resolve()}\n" and not root.exists()
    stranger = tmp_path / "not-a-cluster"
    stranger.mkdir()
    assert kubelm_dev(stranger, "down", "--purge").returncode == 0 and stranger.exists()  # no state: left alone


def test_down_cleans_up_after_a_killed_supervisor(tmp_path: Path) -> None:
    root = tmp_path / "dc"
    assert kubelm_dev(root, "up").returncode == 0
    pgid = _state(root)["supervisor_pid"]
    os.kill(pgid, signal.SIGKILL)
    # The supervisor gone, its components are orphans (whatever they do about it, down must clean up).
    eventually(lambda: not _not_zombie(pgid), timeout=30, interval=0.05, what="the supervisor gone")
    assert marked_processes(root), "components should still be around to clean up"
    assert kubelm_dev(root, "down").returncode == 0
    assert group_members(pgid) == []
    assert marked_processes(root) == []


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
