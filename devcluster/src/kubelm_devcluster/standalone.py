"""A single private redis-server, for tests and benchmarks that need to stop and restart it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .layout import HOST, Ports
from .probes import redis_ping, wait_for


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or Ports.allocate().redis
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("redis-server", lambda: redis_ping(self.port), timeout=10, interval=0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
