"""Workers and gateways as real processes against the session's RabbitMQ and Redis."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from kubelm_contract import queues
from kubelm_contract.queues import QueueSpec
from kubelm_devcluster.probes import http_get
from support import ClusterEnv, eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample from the worker's /metrics; a series it does not export is an error (a renamed metric
        must not read as 0)."""
        _, body = http_get(self.url("/metrics"))
        for line in body.decode().splitlines():
            if line.startswith(f"{name}{labels} "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{self.name} exports no {name}{labels}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Launcher:
    def __init__(self, tmp_path: Path, cluster: ClusterEnv, tiny_model: Path):
        self.tmp_path = tmp_path
        self.cluster = cluster
        self.tiny_model = tiny_model
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        self.started: list[Process] = []

    def _start(self, kind: str, config: dict[str, Any], redis_url: str | None, ready_path: str,
               amqp_url: str | None = None, extra_env: dict[str, str] | None = None) -> Process:
        name = f"{kind}-{len(self.started)}"
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = self.tmp_path / f"{name}.log"
        env = {**os.environ, "KUBELM_AMQP_URL": amqp_url or self.cluster.amqp_url, **(extra_env or {})}
        env.pop("KUBELM_REDIS_URL", None)
        if redis_url:
            env["KUBELM_REDIS_URL"] = redis_url
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "kubelm_runtime", kind, "--config", str(path)],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        port = int(config.get("healthPort") or config.get("port"))  # type: ignore[arg-type]
        started = Process(name, process, port, log)
        self.started.append(started)

        def up() -> bool:
            assert process.poll() is None, f"{name} exited:\n{started.output()[-3000:]}"
            try:
                return http_get(started.url(ready_path))[0] == 200
            except OSError:
                return False

        eventually(up, timeout=90, interval=0.1, what=f"{name} ready")
        return started

    def worker(self, name: str, redis_url: str | None = "", extra_env: dict[str, str] | None = None,
               **overrides: Any) -> Process:
        config: dict[str, Any] = {
            "name": name, "namespace": self.namespace, "model": {"uri": str(self.tiny_model)},
            "batching": {"maxBatchSize": 16, "maxWaitMillis": 20}, "generation": {"maxNewTokens": 8},
            "cacheDir": str(self.tmp_path / "cache"), "healthPort": free_port(), "dtype": "fp32", **overrides}
        return self._start("serve", config, self.cluster.redis_url if redis_url == "" else redis_url, "/readyz",
                           extra_env=extra_env)

    def gateway(self, redis_url: str | None = "", amqp_url: str | None = None, extra_env: dict[str, str] | None = None,
                **overrides: Any) -> Process:
        config = {"namespace": self.namespace, "host": "127.0.0.1", "port": free_port(),
                  "requestTimeoutSeconds": 30, **overrides}
        return self._start("gateway", config, self.cluster.redis_url if redis_url == "" else redis_url, "/readyz",
                           amqp_url, extra_env)

    def stop_all(self) -> None:
        for started in self.started:
            if started.process.poll() is None:
                started.process.send_signal(signal.SIGKILL)
                started.process.wait()


@pytest.fixture
def launcher(tmp_path: Path, cluster: ClusterEnv, tiny_model: Path) -> Iterator[Launcher]:
    launched = Launcher(tmp_path, cluster, tiny_model)
    yield launched
    launched.stop_all()


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str) -> tuple[int, dict[str, Any]]:
    status, body = http_get(url)
    return status, json.loads(body or b"{}")


def rabbit_queue(cluster: ClusterEnv, name: str) -> dict[str, Any]:
    """A queue as the management API reports it."""
    status, body = http_get(f"{cluster.rabbitmq_api_url}/api/queues/%2F/{name}")
    assert status == 200, body
    return json.loads(body)


def connections(cluster: ClusterEnv, name_contains: str) -> set[str]:
    """The broker's names of the AMQP connections whose client-given name contains `name_contains`. The
    management API lists a new connection only after its next statistics round."""
    status, body = http_get(f"{cluster.rabbitmq_api_url}/api/connections")
    assert status == 200, body
    return {c["name"] for c in json.loads(body)
            if name_contains in ((c.get("client_properties") or {}).get("connection_name") or "")}


def close_connection(cluster: ClusterEnv, name: str) -> None:
    """Closes one AMQP connection as the broker does when it restarts or fails over (the client sees
    CONNECTION_FORCED)."""
    parts = urllib.parse.urlsplit(cluster.rabbitmq_api_url)
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}/api/connections/"
                                     f"{urllib.parse.quote(name)}", method="DELETE",
                                     headers={"Authorization": f"Basic {token}", "X-Reason": "closed by a test"})
    urllib.request.urlopen(request, timeout=10).close()


def declare_queues(launcher: Launcher, model: str, spec: QueueSpec | None = None) -> str:
    """The model's queues as a worker declares them (the contract's own function), before any worker runs;
    the request queue's name."""
    connection = pika.BlockingConnection(pika.URLParameters(launcher.cluster.amqp_url))
    name = queues.declare_model_queues(connection.channel(), launcher.namespace, model, spec or QueueSpec())
    connection.close()
    return name


def ready_messages(cluster: ClusterEnv, queue: str) -> int:
    """Messages ready in the queue this moment (a passive declare; the management API's figures lag)."""
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    count = int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    connection.close()
    return count


def dead_letters(cluster: ClusterEnv, namespace: str, model: str) -> list[tuple[dict[str, Any], bytes]]:
    """Takes every message from a model's dead-letter queue: (headers, body) each."""
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = connection.channel()
    found = []
    while True:
        method, properties, body = channel.basic_get(queues.dead_letter_queue(namespace, model), auto_ack=True)
        if method is None:
            break
        found.append((dict(properties.headers or {}), body))
    connection.close()
    return found
