"""Environment variables shared by the operator, the runtime and the dev cluster.

Connection settings are plain URLs so that one variable per system is enough.
"""

KUBECONFIG = "KUBECONFIG"
REDIS_URL = "KUBELM_REDIS_URL"
"""redis://host:port/db of the Redis used for caches, the registry and progress."""
AMQP_URL = "KUBELM_AMQP_URL"
"""amqp://user:password@host:port/vhost of the RabbitMQ broker."""
RABBITMQ_API_URL = "KUBELM_RABBITMQ_API_URL"
"""http://user:password@host:port of the RabbitMQ management API (queue depth)."""
MEMCACHED_URL = "KUBELM_MEMCACHED_URL"
"""memcached://host:port of the Memcached holding response-cache entries of models whose
`cache.responses.backend` is memcached (optional)."""

CONFIG_FILE = "KUBELM_CONFIG"
"""Path of the runtime's JSON or YAML configuration (docs/runtime-contract.md)."""
LOG_LEVEL = "KUBELM_LOG_LEVEL"
VOLUMES_ROOT = "KUBELM_VOLUMES_ROOT"
"""Where the pvc:// claims are mounted (kubelm_contract.volumes)."""
MALLOC = "KUBELM_MALLOC"
"""Memory allocator of serving workers: "jemalloc" (the default; used when installed, by
re-executing the process with it preloaded) or "system"."""

# The operator's own settings (docs/operator.md).
RUNTIME_IMAGE = "KUBELM_RUNTIME_IMAGE"
"""Image the workloads run when a spec names none."""
NAMESPACES = "KUBELM_NAMESPACES"
"""Comma-separated namespaces (globs allowed) the operator watches; empty: every namespace."""
LOG_FORMAT = "KUBELM_LOG_FORMAT"
METRICS_PORT = "KUBELM_METRICS_PORT"
HEALTH_PORT = "KUBELM_HEALTH_PORT"
PROGRESS_INTERVAL = "KUBELM_PROGRESS_INTERVAL_SECONDS"
AUTOSCALE_INTERVAL = "KUBELM_AUTOSCALE_INTERVAL_SECONDS"
WATCH_SERVER_TIMEOUT = "KUBELM_WATCH_SERVER_TIMEOUT_SECONDS"
WATCH_CLIENT_TIMEOUT = "KUBELM_WATCH_CLIENT_TIMEOUT_SECONDS"
REQUEST_TIMEOUT = "KUBELM_REQUEST_TIMEOUT_SECONDS"
RESYNC_INTERVAL = "KUBELM_RESYNC_INTERVAL_SECONDS"
CLEANUP_TIMEOUT = "KUBELM_CLEANUP_TIMEOUT_SECONDS"
PEERING = "KUBELM_PEERING"
"""Deprecated (use LEADER_ELECTION): name of a kopf peering object; empty: standalone."""
LEADER_ELECTION = "KUBELM_LEADER_ELECTION"
"""true: the operator acts only while it holds a coordination.k8s.io Lease in its namespace (replicas
run one at a time, the others wait as standby); false (the default): it acts at once."""
LEASE_NAME = "KUBELM_LEASE_NAME"
LEASE_DURATION = "KUBELM_LEASE_DURATION_SECONDS"
LEASE_RENEW = "KUBELM_LEASE_RENEW_SECONDS"
POD_NAME = "POD_NAME"
"""The pod's own name (downward API): the Lease's holder identity."""
POD_NAMESPACE = "POD_NAMESPACE"
"""The pod's own namespace (downward API): where the Lease lives."""
TERMINATION_LOG = "KUBELM_TERMINATION_LOG"
"""Where a serving worker that cannot load its model writes the one-line reason before exiting 1
(default /dev/termination-log, which Kubernetes shows as the container's termination message)."""
