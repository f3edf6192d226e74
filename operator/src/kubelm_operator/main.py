"""`kubelm-operator`: reads its settings, registers the handlers and runs kopf.

`kopf run -m kubelm_operator` does the same: importing the package's `__main__`
registers everything on kopf's default registry.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import kopf
from prometheus_client import start_http_server

from .builders.common import MANAGED_BY_LABEL
from .config import FIELD_MANAGER, ConfigError, OperatorConfig, from_environ
from .context import Context
from .handlers import languagemodel, trainingjob
from .kube import login
from .persistence import ProgressAnnotations

FINALIZER = "kubelm.io/cleanup"
CHILD_KINDS = (("", "v1", "pods"), ("batch", "v1", "jobs"), ("apps", "v1", "deployments"))
ANNOTATION_PREFIX = "kubelm.io"


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


def run(config: OperatorConfig) -> None:
    configure_logging(config)
    registry = kopf.OperatorRegistry()
    register(config, registry)
    if config.metrics_port:
        start_http_server(config.metrics_port)
    kopf.run(
        registry=registry,
        standalone=config.peering is None,
        peering_name=config.peering,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
    )


def main() -> int:
    try:
        config = from_environ(os.environ)
    except ConfigError as e:
        print(f"kubelm-operator: {e}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
