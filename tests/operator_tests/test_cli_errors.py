"""How the `kubelm` command words the API server's refusals, and those of services it reaches through
the API server's proxy (pure: no cluster)."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from kubelm_operator.cli.cluster import FORBIDDEN, NOT_FOUND, NOT_INSTALLED, Cluster


def translated(status: int, body: dict[str, object]) -> tuple[str, int]:
    cluster = Cluster(None, "default", "https://example:6443")  # type: ignore[arg-type]
    error = cluster._translate(ApiException(status=status, reason="Reason", body=json.dumps(body)), "service a/b")
    return str(error), error.exit_code


def test_a_proxied_service_speaks_through_its_openai_shaped_error() -> None:
    unknown = {"error": {"message": "model 'x' is not served here", "type": "invalid_request_error"}}
    assert translated(404, unknown) == ("service a/b: model 'x' is not served here", NOT_FOUND)
    key = {"error": {"message": "missing or wrong API key", "type": "authentication_error"}}
    assert translated(401, key) == ("access denied to service a/b: missing or wrong API key", FORBIDDEN)


def test_kubernetes_404s_tell_a_missing_object_from_a_missing_api() -> None:
    assert translated(404, {"kind": "Status", "message": "not found", "details": {"name": "b"}}) == (
        "service a/b: not found", NOT_FOUND)
    message, code = translated(404, {"kind": "Status", "message": "the server could not find the resource"})
    assert code == NOT_INSTALLED and "is not installed" in message
