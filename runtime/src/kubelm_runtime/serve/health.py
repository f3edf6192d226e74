"""Worker health and metrics over HTTP: /readyz, /livez, /metrics (Prometheus)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from kubelm_contract import protocol

OUTCOMES = ("ok", "cached", "error", "cancelled")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kubelm_requests", "Requests handled, by outcome", ["outcome"], registry=r)
        self.errors = Counter("kubelm_errors", "Requests answered with an error, by type", ["type"], registry=r)
        self.queue_wait = Histogram("kubelm_queue_wait_seconds", "Time from publish to delivery",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_wait = Histogram("kubelm_batch_wait_seconds", "Time from delivery to joining the running batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Histogram("kubelm_generation_seconds",
                                    "Time from joining the batch to the request's last token",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("kubelm_batch_size", "Rows decoded together, per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.first_token = Histogram("kubelm_time_to_first_token_seconds",
                                     "Time from delivery to the request's first generated token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("kubelm_time_per_output_token_seconds",
                                   "Time between tokens after the first, per row of a request",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
                                   registry=r)
        self.duration = Histogram("kubelm_request_duration_seconds",
                                  "Time from delivery to the reply, for requests decoded here",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("kubelm_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("kubelm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.cache = Counter("kubelm_response_cache", "Response cache lookups", ["result"], registry=r)
        self.stream_messages = Counter("kubelm_stream_messages", "Chunk messages published for streamed requests: "
                                       "one request's, or grouped (several sharing a reply address)", ["kind"],
                                       registry=r)
        self.redelivered = Counter("kubelm_redelivered", "Requests the broker delivered again (after a worker "
                                   "died with them)", registry=r)
        # Every known series exported from the start: a dashboard (or a test) reading 0 reads a real 0.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for kind in protocol.ERROR_KINDS:
            self.errors.labels(kind)
        for result in ("hit", "miss"):
            self.cache.labels(result)
        for kind in ("request", "grouped"):
            self.stream_messages.labels(kind)


class HealthState:
    def __init__(self, liveness_timeout: float):
        self.ready = False
        self.liveness_timeout = liveness_timeout
        self.failing: str | None = None
        """Why the worker should be restarted although its loop runs (its batches keep failing)."""
        self._tick = time.monotonic()

    def tick(self) -> None:
        self._tick = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.failing is None and time.monotonic() - self._tick < self.liveness_timeout

    def liveness(self) -> tuple[bool, str]:
        """(alive, what /livez says)."""
        if self.failing is not None:
            return False, f"failing: {self.failing}\n"
        if not self.alive:
            return False, f"stuck: no loop iteration for {self.liveness_timeout:g}s\n"
        return True, "ok\n"


def serve_health(port: int, state: HealthState, metrics: WorkerMetrics, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/readyz":
                self._send(200 if state.ready else 503, b"ready\n" if state.ready else b"loading\n")
            elif self.path in ("/livez", "/healthz"):
                alive, text = state.liveness()
                self._send(200 if alive else 503, text.encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
