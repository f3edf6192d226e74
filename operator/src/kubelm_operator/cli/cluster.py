"""The `kubelm` command's only door to the Kubernetes API, through the official client.

The command is a short-lived, blocking program run by a person with their own kubeconfig (any context,
exec plugins, OIDC), which is what the official client handles; the operator's own door (`kube`) stays
on kopf's asynchronous session. Every failure leaves here as a CliError with a one-line message and
the documented exit code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

GROUP, VERSION = "kubelm.io", "v1alpha1"
KINDS = {"TrainingJob": "trainingjobs", "LanguageModel": "languagemodels"}
TIMEOUT = 15.0

# Exit codes (docs/cli.md).
NOT_READY = 1
UNREACHABLE = 3
FORBIDDEN = 4
NOT_INSTALLED = 5
NOT_FOUND = 6
REQUEST_FAILED = 7


class CliError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Cluster:
    def __init__(self, api: client.ApiClient, namespace: str, server: str):
        self.api, self.namespace, self.server = api, namespace, server

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Cluster:
        configuration = client.Configuration()
        namespace = "default"
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = context or (active or {}).get("name")
            found = next((c for c in contexts if c.get("name") == chosen), active or {})
            namespace = (found.get("context") or {}).get("namespace") or namespace
        except config.ConfigException as e:
            if kubeconfig or context:
                raise CliError(f"kubeconfig: {e}", UNREACHABLE) from e
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                raise CliError(f"no cluster to talk to: {e} (set KUBECONFIG or --kubeconfig)", UNREACHABLE) from e
        # One quick try: a person waiting at a prompt would rather read why than wait for retries.
        configuration.retries = urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0)
        return cls(client.ApiClient(configuration), namespace, configuration.host)

    # Every call goes through here, so every error is translated the same way.
    def _call(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
              what: str, stream: bool = False, timeout: float | None = TIMEOUT,
              extra_headers: dict[str, str] | None = None) -> Any:
        url = self.server + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json", "Content-Type": "application/json", **(extra_headers or {})}
        self.api.update_params_for_auth(headers, [], ["BearerToken"], path, method, body)
        try:
            response = self.api.rest_client.request(method, url, headers=headers, body=body,
                                                    _request_timeout=timeout)
        except urllib3.exceptions.HTTPError as e:
            raise CliError(f"cannot reach the cluster at {self.server}: {_root(e)}", UNREACHABLE) from e
        except ApiException as e:  # the client's word for a TLS failure
            raise CliError(f"cannot reach the cluster at {self.server}: {e.reason}", UNREACHABLE) from e
        if response.status >= 400:
            raise self._translate(ApiException(status=response.status, reason=response.reason,
                                               body=response.read()), what)
        if stream:
            return response.response
        data = response.read()
        return json.loads(data) if data else None

    def _translate(self, e: ApiException, what: str) -> CliError:
        try:
            body = json.loads(e.body or "{}")
        except ValueError:
            body = {}
        # A Kubernetes Status, or an error the proxied service sent in OpenAI's shape.
        relayed = body.get("error") if isinstance(body.get("error"), dict) else {}
        message = body.get("message") or relayed.get("message") or e.reason or ""
        if e.status in (401, 403):
            return CliError(f"access denied to {what}: {message}", FORBIDDEN)
        if e.status == 404 and relayed:  # the proxied service's own 404 (an unknown model, say)
            return CliError(f"{what}: {message}", NOT_FOUND)
        if e.status == 404 and not (body.get("details") or {}).get("name"):
            return CliError(f"the kubelm API ({GROUP}/{VERSION}) is not installed in this cluster: install it with "
                            "`kubectl apply --server-side -k manifests/install` or the Helm chart", NOT_INSTALLED)
        if e.status == 404:
            return CliError(f"{what}: not found", NOT_FOUND)
        return CliError(f"{what}: {e.status} {message}", REQUEST_FAILED)

    @staticmethod
    def _path(kind: str, namespace: str | None, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}" + (f"/namespaces/{namespace}" if namespace else "")
        return f"{base}/{KINDS[kind]}" + (f"/{name}" if name else "")

    def objects(self, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        """Objects of one kind in a namespace, or in all of them when namespace is None."""
        where = f"namespace {namespace}" if namespace else "all namespaces"
        found = self._call("GET", self._path(kind, namespace), what=f"{KINDS[kind]} in {where}")
        return [dict(item, kind=kind) for item in found.get("items", [])]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        try:
            return dict(self._call("GET", self._path(kind, namespace, name),
                                   what=f"{kind} {namespace}/{name}"))
        except CliError as e:
            if e.exit_code != NOT_FOUND:
                raise
            # Tell a missing object from a missing API: the list answers 404 only without the CRD.
            self.objects(kind, namespace)
            raise

    def events(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        found = self._call("GET", f"/api/v1/namespaces/{namespace}/events",
                           query={"fieldSelector": f"involvedObject.uid={uid}"}, what=f"events in {namespace}")
        return list(found.get("items", []))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = self._call("GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector},
                           what=f"pods in {namespace}")
        return list(found.get("items", []))

    def follow_log(self, namespace: str, pod: str, container: str, follow: bool = True) -> Iterator[str]:
        response = self._call("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log",
                              query={"container": container, "follow": str(follow).lower()}, stream=True,
                              timeout=None, what=f"logs of pod {namespace}/{pod}")
        try:
            yield from iter_resp_lines(response)
        finally:
            response.release_conn()

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded."""
        what = f"Secret {namespace}/{name}"
        found = self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", what=what)
        encoded = (found.get("data") or {}).get(key)
        if encoded is None:
            raise CliError(f"{what} has no key {key!r}", NOT_FOUND)
        return base64.b64decode(encoded).decode().strip()

    def post_to_service(self, namespace: str, service: str, port: int, path: str, body: dict[str, Any],
                        timeout: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """POST through the API server's service proxy: works from anywhere the kubeconfig works. The proxy
        passes other headers on, but not Authorization, which authenticates the caller to the API server."""
        return dict(self._call("POST", f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}",
                               body=body, timeout=timeout, what=f"service {namespace}/{service}",
                               extra_headers=headers))


def _root(error: BaseException) -> str:
    """The innermost cause of a connection failure: 'Connection refused' rather than urllib3's retry story."""
    while isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason
    return str(error).split(": ", 1)[-1] if "Connection" in type(error).__name__ else str(error)
