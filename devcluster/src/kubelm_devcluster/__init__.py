"""A local Kubernetes control plane, Redis and RabbitMQ running as processes.

For development and tests on machines without a container engine; not shipped.
"""
