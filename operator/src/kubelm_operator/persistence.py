"""Where kopf keeps its bookkeeping: the last handled spec in this process, progress in annotations.

kopf's defaults cost every object one more write than its finalizer: the spec it last handled
and a marker, as annotations, patched once its handlers succeed, and that patch comes back to
every watcher as an event. At a few hundred new objects that write was an eighth of the API
server's work. The handlers here are level-based and idempotent, so the last handled spec need
not outlive the process: a restarted operator sees every object as new and reconciles it once,
which its resume handlers would have done anyway. Progress (retries with their backoff) stays
in annotations, where kopf's retry wake-up needs it; it is written only while a handler fails.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, cast

import kopf


class HandledSpecs(kopf.DiffBaseStorage):
    """The spec each custom resource was last handled with, by uid, kept in memory.

    Only the spec is compared: the handlers react to nothing else (`field="spec"`), and copying
    whole bodies (a pod's status, managed fields) for every watch event of every kind was the
    largest single cost of kopf's processing. Objects of other groups (pods, Jobs) have no
    changing handlers and get an empty essence.
    """

    def __init__(self, group: str):
        super().__init__()
        self._api_prefix = f"{group}/"
        self._specs: dict[str, kopf.BodyEssence] = {}

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if not str(body.get("apiVersion", "")).startswith(self._api_prefix):
            return cast(kopf.BodyEssence, {})
        return cast(kopf.BodyEssence, {"spec": copy.deepcopy(dict(body.get("spec") or {}))})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self._specs.get(str(body.metadata.uid))

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._specs[str(body.metadata.uid)] = essence

    def forget(self, uid: str) -> None:
        self._specs.pop(uid, None)

    def __len__(self) -> int:
        return len(self._specs)


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's handler progress in annotations under our prefix, without its "kopf-managed" marker.

    kopf adds the marker the first time it stores anything, even progress it removes again in the
    same patch, so every new object would get a write for it. It only tells other kopf operators'
    default diff bases to ignore our prefix; ours ignores every annotation.
    """

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """kopf strips progress annotations from both essences of every event, deep-copying each first;
        the essences `HandledSpecs` builds hold no metadata and are never changed in place."""
        return essence if "metadata" not in essence else super().clear(essence=essence)
