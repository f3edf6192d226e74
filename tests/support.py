"""Helpers shared by the tests (importable as `support`)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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




class TcpForwarder:
    """A TCP forwarder in front of a server that can go away or stop answering: what a client sees when
    the network or the server is down, or when the server's side of a connection goes silent."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.open = True
        self._answering = threading.Event()
        self._answering.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:  # accepted while going down
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self._answering), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
        try:
            while data := source.recv(65536):
                while gate is not None and not gate.wait(0.1):
                    if not self.open:
                        raise OSError("forwarder down")
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def hold_answers(self) -> None:
        """The server's bytes stop reaching clients; what clients send still arrives."""
        self._answering.clear()

    def down(self) -> None:
        """No new connections (refused), and every open one cut."""
        self.open = False
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        self.listener.close()
        for s in self.sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@contextmanager
def forwarded(url: str) -> Iterator[tuple[TcpForwarder, str]]:
    """A forwarder in front of the server at `url` (e.g. amqp://user:pass@host:port/) and the URL
    that goes through it."""
    parts = urllib.parse.urlsplit(url)
    forwarder = TcpForwarder(int(parts.port or 5672))
    credentials = f"{parts.username}:{parts.password}@" if parts.username else ""
    try:
        yield forwarder, parts._replace(netloc=f"{credentials}127.0.0.1:{forwarder.port}").geturl()
    finally:
        forwarder.down()
