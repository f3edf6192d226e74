"""For `kopf run -m kubelm_operator.kopf_entry`: the same handlers and settings on kopf's default registry.

kopf's command line then decides namespaces, peering and the liveness endpoint
itself; `kubelm-operator` takes them from the environment instead.
"""

from __future__ import annotations

import os

import kopf

from .config import from_environ
from .main import register

context = register(from_environ(os.environ), kopf.get_default_registry())
