"""`kubelm-operator`: reads its settings, registers the handlers and runs kopf; under leader election
(KUBELM_LEADER_ELECTION) only while it holds the Lease, waiting as standby before.

`kopf run -m kubelm_operator` does the same: importing the package's `__main__`
registers everything on kopf's default registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import kopf
from prometheus_client import start_http_server

from kubelm_contract import env

from . import health, leader
from .builders.common import MANAGED_BY_LABEL
from .config import FIELD_MANAGER, ConfigError, OperatorConfig, from_environ
from .context import Context
from .election import Elector
from .handlers import languagemodel, trainingjob
from .kube import Kube, login
from .persistence import ProgressAnnotations

FINALIZER = "kubelm.io/cleanup"
CHILD_KINDS = (("", "v1", "pods"), ("batch", "v1", "jobs"), ("apps", "v1", "deployments"), ("", "v1", "configmaps"),
               ("", "v1", "services"))
ANNOTATION_PREFIX = "kubelm.io"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

log = logging.getLogger(__name__)


ROUTINE_SUCCESS = re.compile(r"^(Handler|Timer) '[^']+' succeeded\.$")


def quiet_routine_successes(record: logging.LogRecord) -> bool:
    """kopf says "Handler 'x' succeeded." at INFO for every watch event and timer tick: a line per event
    and per model every autoscaler interval, which hid everything else. They are kept at DEBUG; what a
    change did ("Creation is processed", failures, retries) stays."""
    if record.levelno == logging.INFO and ROUTINE_SUCCESS.match(record.getMessage()):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def configure_logging(config: OperatorConfig) -> None:
    if config.log_format == "json":
        # Each line about an object names it under "object" (apiVersion, kind, namespace, name, uid).
        kopf.configure(log_format=kopf.LogFormat.JSON, log_refkey="object")
    else:
        kopf.configure(log_format=kopf.LogFormat.FULL)
    logging.getLogger().setLevel(config.log_level)
    logging.getLogger("kopf.objects").addFilter(quiet_routine_successes)
    # aiohttp's access noise and kopf's per-event debug lines stay out of INFO.
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def register(config: OperatorConfig, registry: kopf.OperatorRegistry) -> Context:
    ctx = Context.create(config)

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        # kopf's retries live in annotations under our prefix (status belongs to the CRD's schema), the
        # last handled spec in memory: no write of its own for an object that reconciles the first time.
        settings.persistence.progress_storage = ProgressAnnotations(prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = ctx.handled
        # Of the built-in kinds the operator watches only what it made: filtered by the API server, so a
        # cluster's other pods, Jobs and Deployments never reach this process.
        for kind in CHILD_KINDS:
            settings.watching.label_selectors[kind] = f"{MANAGED_BY_LABEL}={FIELD_MANAGER}"
        # Our handlers post the Events that matter; kopf posts only its warnings and errors.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = config.watch_server_timeout_seconds
        settings.watching.client_timeout = config.watch_client_timeout_seconds
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = config.request_timeout_seconds
        settings.networking.connect_timeout = 30

    @kopf.on.login(id="login", registry=registry)
    def credentials(**_: Any) -> kopf.ConnectionInfo:
        return login()

    @kopf.on.cleanup(id="close", registry=registry)
    async def close(**_: Any) -> None:
        await ctx.close()

    trainingjob.register(ctx, registry)
    languagemodel.register(ctx, registry)
    return ctx


def run(config: OperatorConfig) -> int:
    configure_logging(config)
    registry = kopf.OperatorRegistry()
    register(config, registry)
    if config.metrics_port:
        start_http_server(config.metrics_port)
    if config.leader_election:
        return asyncio.run(run_elected(config, registry, lease_namespace(config)))
    if config.peering:
        log.warning("%s is deprecated: set %s=true instead (docs/operator.md, \"Two replicas\").",
                    env.PEERING, env.LEADER_ELECTION)
    kopf.run(
        registry=registry,
        standalone=config.peering is None,
        peering_name=config.peering,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
    )
    return 0


def lease_namespace(config: OperatorConfig) -> str:
    if config.lease_namespace:
        return config.lease_namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise ConfigError(f"{env.LEADER_ELECTION}=true needs the operator's namespace: set {env.POD_NAMESPACE} "
                          "(the install passes it from the downward API)") from None


async def run_elected(config: OperatorConfig, registry: kopf.OperatorRegistry, namespace: str) -> int:
    """kopf runs only while this process holds the Lease; before, it waits as standby."""
    stopping = asyncio.Event()
    _on_signals(stopping)
    kube = Kube(timeout=leader.renew_deadline(config.lease_duration_seconds) / 2)
    me = leader.identity(config.pod_name, socket.gethostname(), os.getpid())
    elector = Elector(kube, namespace, config.lease_name, me, config.lease_duration_seconds,
                      config.lease_renew_seconds)
    probe = await health.serve(config.health_port, elector.report) if config.health_port else None
    try:
        if not await elector.acquire(stopping):
            log.info("Leader election: stopped while standby.")
            return 0
        # Created before kopf starts, so that kopf's shutdown does not count it among its own tasks.
        holding = asyncio.create_task(elector.hold(), name="leader lease")
        operator = asyncio.create_task(_kopf(config, registry, stopping), name="kopf")
        await asyncio.wait({holding, operator}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done():
            lost = holding.exception()
            log.error("Leader election: %s; exiting at once so that only the new holder acts.", lost)
            exit_now(1)
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        # Only now that kopf has stopped: the next holder must not overlap with a handler still running here.
        await elector.release()
        operator.result()
        return 0
    finally:
        if probe is not None:
            await probe.cleanup()
        await kube.close()


async def _kopf(config: OperatorConfig, registry: kopf.OperatorRegistry, stopping: asyncio.Event) -> None:
    """kopf.operator(), except that signals keep setting `stopping`, which kopf watches as its stop flag:
    with kopf's own signal handlers its waiter on that flag would stay pending, and kopf waits for such
    leftovers before it returns."""
    existing = asyncio.all_tasks()
    tasks = await kopf.spawn_tasks(registry=registry, standalone=True, clusterwide=not config.namespaces,
                                   namespaces=config.namespaces, stop_flag=stopping)
    _on_signals(stopping)
    await kopf.run_tasks(tasks, ignored=existing)


def _on_signals(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        log.info("Signal %s received: stopping.", sig.name)
        stopping.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)


def exit_now(code: int) -> NoReturn:
    """Ends the process without running kopf's shutdown, during which handlers would still write."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    try:
        config = from_environ(os.environ)
        if config.leader_election:
            lease_namespace(config)
    except ConfigError as e:
        print(f"kubelm-operator: {e}", file=sys.stderr)
        return 2
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
