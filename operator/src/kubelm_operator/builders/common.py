"""Pieces every child object shares: identity of the owner, labels, the restricted security context."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from ..config import FIELD_MANAGER
from ..naming import label_value

GROUP = "kubelm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME_UID = 10001
"""The non-root user of the runtime image (Dockerfile.runtime)."""


@dataclass(frozen=True)
class Owner:
    """The custom resource a child belongs to."""

    kind: str
    namespace: str
    name: str
    uid: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, body: Any) -> Owner:
        meta = body["metadata"]
        return cls(str(body["kind"]), str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
"""On every child, with the operator's field manager as its value: the operator watches only these."""


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": owner.kind, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubelm",
        "app.kubernetes.io/instance": label_value(owner.name),
        "app.kubernetes.io/component": component,
        MANAGED_BY_LABEL: FIELD_MANAGER,
        f"{GROUP}/{owner.kind.lower()}": label_value(owner.name),
    }


def metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner_reference(owner)], **extra}


def pod_security_context() -> dict[str, Any]:
    """What Pod Security Admission's `restricted` level asks of a pod, with a fixed non-root uid."""
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def secret_data(values: dict[str, str]) -> dict[str, str]:
    """A Secret's `data` (base64). Applied as `data`, never `stringData`: the API server folds stringData into
    data, so a key the operator stops sending would stay in the Secret for good."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
