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

CONFIG_FILE = "KUBELM_CONFIG"
"""Path of the runtime's JSON or YAML configuration (docs/runtime-contract.md)."""
LOG_LEVEL = "KUBELM_LOG_LEVEL"
MALLOC = "KUBELM_MALLOC"
"""Memory allocator of serving workers: "jemalloc" (the default; used when installed, by
re-executing the process with it preloaded) or "system"."""
