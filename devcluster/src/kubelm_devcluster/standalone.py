"""A single private redis-server or memcached, for tests and benchmarks that need to stop and restart it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Self

from .layout import HOST, Ports
from .probes import redis_ping, tcp_open, wait_for


class _Server:
    """A server process of this module: started by `start`, killed by `stop` (or the with block)."""

    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(_Server):
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


class MemcachedServer(_Server):
    """memcached from the Debian package, on loopback (the response cache's second backend)."""

    def __init__(self, port: int | None = None, memory_mib: int = 64):
        self.port = port or Ports.allocate().redis
        self.memory_mib = memory_mib
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"memcached://{HOST}:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["memcached", "--listen", HOST, "--port", str(self.port), "--udp-port", "0",
             "--memory-limit", str(self.memory_mib), "--user", "nobody"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("memcached", lambda: tcp_open(self.port, HOST), timeout=10, interval=0.05)
