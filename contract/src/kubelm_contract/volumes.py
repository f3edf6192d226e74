"""How model and dataset locations map to paths inside a pod.

The operator mounts each PersistentVolumeClaim named in a ``pvc://`` URI at
``<VOLUMES_ROOT>/<claim>``; the runtime resolves the same URI to the same path.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from . import env

DEFAULT_VOLUMES_ROOT = "/mnt/kubelm/volumes"


class LocationError(ValueError):
    pass


def claim_of(uri: str) -> str | None:
    """The claim a pvc:// URI names, or None for plain paths."""
    if not uri.startswith("pvc://"):
        return None
    claim = uri[len("pvc://"):].split("/", 1)[0]
    if not claim:
        raise LocationError(f"{uri!r}: pvc:// needs a claim name")
    return claim


def local_path(uri: str, volumes_root: str | None = None) -> str:
    """pvc://claim/a/b -> <root>/claim/a/b; file:///x -> /x; /x -> /x."""
    if uri.startswith("pvc://"):
        claim = claim_of(uri)
        rest = uri[len("pvc://") + len(str(claim)):].lstrip("/")
        root = volumes_root or os.environ.get(env.VOLUMES_ROOT, DEFAULT_VOLUMES_ROOT)
        return str(PurePosixPath(root, str(claim), rest))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not uri.startswith("/"):
        raise LocationError(f"{uri!r}: expected pvc://<claim>/<path>, file:///<path> or an absolute path")
    return uri
