"""kubelm installed on the dev cluster and its operator run as a local process.

Installs the shipped base and RBAC with kubectl, and runs `kubelm-operator` with a
kubeconfig holding only a TokenRequest token of the shipped ServiceAccount: the
operator gets exactly the rights the install manifests grant, never admin. Until
the dev cluster has a node that runs images, this is how tests, benchmarks and the
demo run the operator.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .probes import wait_for

REPO = Path(__file__).resolve().parents[3]
OPERATOR_NAMESPACE = "kubelm-system"
SERVICE_ACCOUNT = "kubelm-operator"
Kubectl = Callable[..., str]
"""kubectl(*args, input=None) -> stdout; raises on failure."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install(kubectl: Kubectl, field_manager: str = "kubelm-dev") -> None:
    """The CRDs, the namespace, the RBAC and the finalizer policy, server-side applied as a user would."""
    for part in ("base", "rbac", "admission"):
        kubectl("apply", "--server-side", f"--field-manager={field_manager}", "-k", str(REPO / "manifests" / part))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            "crd/trainingjobs.kubelm.io", "crd/languagemodels.kubelm.io")

    # Established is not yet served: for a moment after it, the API server answers 503 "resource kind not
    # found" to requests for the new kinds. Listing them succeeds once they are.
    def served() -> bool:
        try:
            kubectl("get", "trainingjobs.kubelm.io,languagemodels.kubelm.io", "--all-namespaces")
        except Exception:  # whatever kubectl raised: the kinds are not served yet
            return False
        return True
    wait_for("the new kinds served", served, timeout=60, interval=0.2)

    # The finalizer policy needs the kinds' schemas, which the API server publishes a little later; until
    # then it answers 503 to creating them. A server-side dry run of each sample goes through admission.
    def admitted() -> bool:
        try:
            for sample in ("trainingjob-cpu.yaml", "languagemodel-cpu.yaml"):
                kubectl("create", "--dry-run=server", "-n", OPERATOR_NAMESPACE, "-f",
                        str(REPO / "manifests" / "samples" / sample))
        except Exception:  # whatever kubectl raised: not admitted yet
            return False
        return True
    wait_for("new objects admitted", admitted, timeout=120, interval=0.5)


def service_account_kubeconfig(kubectl: Kubectl, admin_kubeconfig: Path, out: Path, duration: str = "24h",
                               account: str = SERVICE_ACCOUNT, namespace: str = OPERATOR_NAMESPACE) -> Path:
    """A kubeconfig for a ServiceAccount (the operator's by default): the admin's cluster entry with a
    requested token."""
    token = kubectl("create", "token", account, "-n", namespace, f"--duration={duration}").strip()
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    out.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kubelm-dev", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "kubelm-dev", "context": {"cluster": "kubelm-dev", "user": account}}],
        "current-context": "kubelm-dev"}))
    return out


@dataclass
class OperatorProcess:
    """`python -m kubelm_operator` with its own ports and log file; start, kill and start again."""

    kubeconfig: Path
    redis_url: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self, **env: str) -> None:
        assert not self.running, "already running"
        self.metrics_port, self.health_port = free_port(), free_port()
        self.starts += 1
        environ = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBELM_REDIS_URL": self.redis_url,
                   "KUBELM_METRICS_PORT": str(self.metrics_port), "KUBELM_HEALTH_PORT": str(self.health_port),
                   **self.env, **env}
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "kubelm_operator"], env=environ, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"operator exited ({code}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_for("operator liveness endpoint", self.healthy, timeout)

    def kill(self) -> None:
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 60) -> None:
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_bytes(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line for the operator process")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the operator process has used so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the Prometheus endpoint; a series that does not exist is an error, never 0."""
        wanted = {f'{k}="{v}"' for k, v in labels.items()}
        for line in self.metrics_text().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                series, value = line.rsplit(" ", 1)
                found = set(series[series.find("{") + 1:series.rfind("}")].split(",")) if "{" in series else set()
                if wanted <= found:
                    return float(value)
        raise LookupError(f"no metric {name} with {labels} on the operator's endpoint")
