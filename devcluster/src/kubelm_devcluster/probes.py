"""Small HTTP and TCP calls the supervisor uses to see whether components are up.

Plain urllib keeps the supervisor free of client libraries; the apiserver is
reached with the admin client certificate.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .pki import ClusterPKI


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2,
              alive: Callable[[], None] | None = None) -> None:
    """Calls check until it returns True; alive raises when a process it waits for has died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive:
            alive()
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f": {last}" if last else ""))


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2) -> tuple[int, bytes]:
    parts = urlsplit(url)
    request = urllib.request.Request(url)
    if parts.username:
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        request = urllib.request.Request(parts._replace(netloc=netloc).geturl())
        token = b64encode(f"{parts.username}:{parts.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def insecure_tls() -> ssl.SSLContext:
    """For the controller-manager's and scheduler's self-signed health endpoints."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class KubeClient:
    """JSON calls against the apiserver as the admin user."""

    def __init__(self, server: str, pki: ClusterPKI):
        self.server = server
        self.context = ssl.create_default_context(cafile=str(pki.ca.cert))
        self.context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))

    def request(self, method: str, path: str, body: object | None = None,
                content_type: str = "application/json") -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=5) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"raw": raw.decode(errors="replace")}
        return status, payload

    def readyz(self) -> bool:
        status, _ = http_get(self.server + "/readyz", self.context)
        return status == 200

    def version(self) -> str:
        _, payload = self.request("GET", "/version")
        return str(payload.get("gitVersion", ""))


def write_json(path: Path, data: object) -> None:
    """Atomically, so readers never see a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
