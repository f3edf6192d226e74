"""The operator's settings, read once from the environment (docs/operator.md lists them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from kubelm_contract import env

DEFAULT_RUNTIME_IMAGE = "kubelm/runtime:0.1.0"
FIELD_MANAGER = "kubelm-operator"


class ConfigError(ValueError):
    """An operator setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class OperatorConfig:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    redis_url: str | None = None
    amqp_url: str | None = None
    rabbitmq_api_url: str | None = None
    memcached_url: str | None = None
    """Passed to the pods of models whose response cache lives in Memcached."""
    namespaces: tuple[str, ...] = ()
    """Empty: every namespace."""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    metrics_port: int = 8080
    """0 turns the Prometheus endpoint off."""
    health_port: int = 8081
    progress_interval_seconds: float = 10.0
    autoscale_interval_seconds: float = 2.0
    watch_server_timeout_seconds: int = 300
    watch_client_timeout_seconds: int = 330
    request_timeout_seconds: float = 30.0
    resync_seconds: float = 300.0
    """Children are applied again at least this often (jittered), which reverts hand edits of what the
    operator owns."""
    cleanup_timeout_seconds: float = 900.0
    """A finalizer that cannot clean external state for this long after deletion gives up (0: never)."""
    peering: str | None = None
    """Deprecated: kopf peering; leader election replaces it."""
    leader_election: bool = False
    """Act only while holding the Lease `lease_name` in `lease_namespace` (docs/operator.md, "Two replicas")."""
    lease_name: str = "kubelm-operator"
    lease_namespace: str | None = None
    """The pod's namespace when the Deployment passes it; else the service account's namespace."""
    lease_duration_seconds: int = 12
    lease_renew_seconds: float = 2.0
    pod_name: str | None = None
    """The Lease's holder identity when set; else host name and process id."""


def _number(environ: Mapping[str, str], name: str, default: float, cast: type = float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _number(environ, name, default)
    if value == 0:
        raise ConfigError(f"{name} must be more than 0")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    return raw == "true"


def _lease(environ: Mapping[str, str]) -> tuple[int, float]:
    duration = int(_number(environ, env.LEASE_DURATION, 12, int))
    renew = _positive(environ, env.LEASE_RENEW, 2.0)
    # The holder steps down after two thirds of the duration without a renewal: room for two tries at least.
    if duration < 1 or renew * 3 > duration:
        raise ConfigError(f"{env.LEASE_RENEW}={renew:g} must be at most a third of "
                          f"{env.LEASE_DURATION}={duration}")
    return duration, renew


def from_environ(environ: Mapping[str, str]) -> OperatorConfig:
    log_format = environ.get(env.LOG_FORMAT, "text").strip() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"{env.LOG_FORMAT}={log_format!r}: expected text or json")
    interval = _number(environ, env.PROGRESS_INTERVAL, 10.0)
    autoscale = _number(environ, env.AUTOSCALE_INTERVAL, 2.0)
    for name, value in ((env.PROGRESS_INTERVAL, interval), (env.AUTOSCALE_INTERVAL, autoscale)):
        if value == 0:
            raise ConfigError(f"{name} must be more than 0")
    leader_election = _flag(environ, env.LEADER_ELECTION)
    peering = environ.get(env.PEERING, "").strip() or None
    if leader_election and peering:
        raise ConfigError(f"{env.PEERING} and {env.LEADER_ELECTION}=true exclude each other: unset {env.PEERING}")
    lease_duration, lease_renew = _lease(environ)
    return OperatorConfig(
        runtime_image=environ.get(env.RUNTIME_IMAGE, "").strip() or DEFAULT_RUNTIME_IMAGE,
        redis_url=environ.get(env.REDIS_URL) or None,
        amqp_url=environ.get(env.AMQP_URL) or None,
        rabbitmq_api_url=environ.get(env.RABBITMQ_API_URL) or None,
        memcached_url=environ.get(env.MEMCACHED_URL) or None,
        namespaces=tuple(n.strip() for n in environ.get(env.NAMESPACES, "").split(",") if n.strip()),
        log_format=log_format,  # type: ignore[arg-type]
        log_level=(environ.get(env.LOG_LEVEL, "INFO").strip() or "INFO").upper(),
        metrics_port=int(_number(environ, env.METRICS_PORT, 8080, int)),
        health_port=int(_number(environ, env.HEALTH_PORT, 8081, int)),
        progress_interval_seconds=interval,
        autoscale_interval_seconds=autoscale,
        watch_server_timeout_seconds=int(_number(environ, env.WATCH_SERVER_TIMEOUT, 300, int)),
        watch_client_timeout_seconds=int(_number(environ, env.WATCH_CLIENT_TIMEOUT, 330, int)),
        request_timeout_seconds=_number(environ, env.REQUEST_TIMEOUT, 30.0),
        resync_seconds=_positive(environ, env.RESYNC_INTERVAL, 300.0),
        cleanup_timeout_seconds=_number(environ, env.CLEANUP_TIMEOUT, 900.0),
        peering=peering,
        leader_election=leader_election,
        lease_name=environ.get(env.LEASE_NAME, "").strip() or "kubelm-operator",
        lease_namespace=environ.get(env.POD_NAMESPACE, "").strip() or None,
        lease_duration_seconds=lease_duration,
        lease_renew_seconds=lease_renew,
        pod_name=environ.get(env.POD_NAME, "").strip() or None,
    )
