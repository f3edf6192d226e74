"""Content digests of plain objects, stable across processes (sorted keys, compact JSON)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]
