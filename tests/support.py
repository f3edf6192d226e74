"""Helpers shared by the tests (importable as `support`)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ClusterEnv:
    kubeconfig: str
    redis_url: str
    amqp_url: str
    rabbitmq_api_url: str
    kubectl_path: str

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True, text=True, input=input, timeout=120,
        )
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result


def eventually(check: Callable[[], bool], timeout: float = 30, interval: float = 0.25, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"not true after {timeout}s: {what or check}")


