"""The operator's only door to the Kubernetes API.

Requests go over aiohttp (kopf's own HTTP client) with the credentials kopf's login
found (service account in a pod, kubeconfig elsewhere), so nothing here blocks the
event loop. Writes are server-side applies under one field manager; Jobs, whose pod
template is immutable, are created once and then only patched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from .config import FIELD_MANAGER
from .status.observed import controller_uid

log = logging.getLogger(__name__)

# Kind -> (API path prefix, plural) of everything the operator reads or writes.
RESOURCES: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentications",
    ("kubelm.io/v1alpha1", "TrainingJob"): "trainingjobs",
    ("kubelm.io/v1alpha1", "LanguageModel"): "languagemodels",
    ("coordination.k8s.io/v1", "Lease"): "leases",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str, method: str, path: str):
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        """The object was refused for what it says (422): retrying the same request cannot help."""
        return self.status == 422

    @property
    def forbidden(self) -> bool:
        return self.status == 403


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
         subresource: str | None = None) -> str:
    plural = RESOURCES[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def path_of(obj: dict[str, Any], subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)


@dataclass
class _Session:
    http: aiohttp.ClientSession
    server: str
    headers: dict[str, str]


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=_text(info.ca_data) if info.ca_data else None)
    if info.certificate_path or info.certificate_data:
        # load_cert_chain reads files only: inline data goes through short-lived files.
        with tempfile.NamedTemporaryFile("w") as cert, tempfile.NamedTemporaryFile("w") as key:
            cert_path, key_path = info.certificate_path, info.private_key_path
            if info.certificate_data:
                cert.write(_text(info.certificate_data))
                cert.flush()
                cert_path = cert.name
            if info.private_key_data:
                key.write(_text(info.private_key_data))
                key.flush()
                key_path = key.name
            context.load_cert_chain(str(cert_path), str(key_path) if key_path else None)
    return context


def _text(data: str | bytes) -> str:
    if isinstance(data, bytes):
        return data.decode()
    # kubeconfig "-data" fields are base64; kopf passes them through as they are.
    try:
        decoded = base64.b64decode(data, validate=True).decode()
        return decoded if "-----BEGIN" in decoded else data
    except (ValueError, UnicodeDecodeError):
        return data


def login() -> kopf.ConnectionInfo:
    """Service account credentials in a pod, the kubeconfig elsewhere (KUBECONFIG or ~/.kube/config)."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig found")
    return info


class Kube:
    """An asynchronous client for the few calls the operator makes; one per event loop."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo] = login, timeout: float = 30.0,
                 connections: int = 16):
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._session: _Session | None = None
        self._lock = asyncio.Lock()

    async def _open(self, renew: bool = False) -> _Session:
        async with self._lock:
            if self._session is not None and not renew:
                return self._session
            if self._session is not None:
                await self._session.http.close()
            info = self._credentials()
            headers = {"User-Agent": FIELD_MANAGER, "Accept": "application/json"}
            if info.token:
                headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
            elif info.username and info.password:
                headers["Authorization"] = aiohttp.encode_basic_auth(info.username, info.password)
            connector = aiohttp.TCPConnector(ssl=_ssl_context(info), limit=self._connections)
            http = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._session = _Session(http, info.server.rstrip("/"), headers)
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.http.close()
            self._session = None

    async def request(self, method: str, url_path: str, body: Any = None, *,
                      content_type: str = "application/json", params: dict[str, str] | None = None,
                      accept: str | None = None) -> Any:
        for attempt in (1, 2):
            session = await self._open(renew=attempt == 2)
            headers = dict(session.headers)
            if accept:
                headers["Accept"] = accept
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body, separators=(",", ":"))
            async with session.http.request(method, session.server + url_path, data=data, headers=headers,
                                            params=params) as response:
                text = await response.text()
                if response.status == 401 and attempt == 1:
                    # Projected service account tokens rotate: read them again once.
                    continue
                if response.status >= 400:
                    try:
                        status = json.loads(text)
                        reason, message = str(status.get("reason", "")), str(status.get("message", text))
                    except ValueError:
                        reason, message = response.reason or "", text
                    raise ApiError(response.status, reason, message, method, url_path)
                return json.loads(text) if text else None
        raise AssertionError("unreachable")

    async def apply(self, obj: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply as the operator's field manager; fields it no longer sends are removed."""
        return await self.request(  # type: ignore[no-any-return]
            "PATCH", path_of(obj, subresource), obj, content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"})

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Creates `obj`; None when it exists already."""
        meta = obj["metadata"]
        try:
            return await self.request(  # type: ignore[no-any-return]
                "POST", path(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj,
                params={"fieldManager": FIELD_MANAGER})
        except ApiError as e:
            if e.conflict:
                return None
            raise

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replaces `obj` whole; with metadata.resourceVersion set, a 409 (ApiError.conflict) says someone
        else wrote it since it was read."""
        return await self.request(  # type: ignore[no-any-return]
            "PUT", path_of(obj), obj, params={"fieldManager": FIELD_MANAGER})

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str,
                          patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "PATCH", path(api_version, kind, namespace, name), patch,
            content_type="application/merge-patch+json", params={"fieldManager": FIELD_MANAGER})

    async def scale(self, api_version: str, kind: str, namespace: str, name: str, replicas: int) -> None:
        """Sets replicas through the scale subresource, the only part of a Deployment the autoscaler owns."""
        await self.request("PATCH", path(api_version, kind, namespace, name, "scale"),
                           {"spec": {"replicas": replicas}}, content_type="application/merge-patch+json",
                           params={"fieldManager": FIELD_MANAGER + "-autoscaler"})

    async def delete_owned(self, api_version: str, kind: str, namespace: str, name: str, owner_uid: str) -> bool:
        """Deletes the object when its controller is `owner_uid` (never one another owner or a person made);
        True when a deletion was sent. The uid precondition keeps a same-named newer object safe."""
        try:
            found = await self.get(api_version, kind, namespace, name)
        except ApiError as e:
            if e.not_found:  # the kind is not served (KEDA not installed)
                return False
            raise
        if found is None or controller_uid(found) != owner_uid:
            return False
        try:
            await self.request("DELETE", path(api_version, kind, namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background",
                                "preconditions": {"uid": found["metadata"]["uid"]}})
        except ApiError as e:
            if e.not_found or e.conflict:  # gone already, or replaced by another object of that name
                return False
            raise
        return True

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = await self.request("GET", path(api_version, kind, namespace), params={"labelSelector": label_selector})
        return list((found or {}).get("items") or [])

    async def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Whether the object exists, asked for its metadata only (a Secret's data never reaches the operator)."""
        try:
            await self.request("GET", path(api_version, kind, namespace, name),
                               accept="application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
        except ApiError as e:
            if e.not_found:
                return False
            raise
        return True

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path(api_version, kind, namespace, name))  # type: ignore[no-any-return]
        except ApiError as e:
            if e.not_found:
                return None
            raise
