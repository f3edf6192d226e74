"""What only a real control plane does: RBAC enforcement and garbage collection of owned objects."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from support import eventually

from .conftest import GROUP, VERSION

pytestmark = pytest.mark.cluster


def _token_client(api_client: client.ApiClient, namespace: str, service_account: str) -> client.ApiClient:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": service_account}})
    token = core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": 600}}).status.token
    configuration = client.Configuration()
    configuration.host = api_client.configuration.host
    configuration.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def test_service_account_without_rights_is_forbidden(api_client: client.ApiClient,
                                                     custom: client.CustomObjectsApi, namespace: str) -> None:
    as_nobody = client.CustomObjectsApi(_token_client(api_client, namespace, "nobody"))
    with pytest.raises(ApiException) as info:
        as_nobody.list_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels")
    assert info.value.status == 403
    assert "system:serviceaccount:" + namespace + ":nobody" in info.value.body

    # A Role granting read access makes the same token work: the 403 was RBAC, not a broken token.
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "lm-reader"},
        "rules": [{"apiGroups": [GROUP], "resources": ["languagemodels"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "nobody-reads-lm"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}]})

    def can_list() -> bool:
        try:
            as_nobody.list_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels")
            return True
        except ApiException as e:
            assert e.status == 403
            return False

    eventually(can_list, timeout=15, what="role binding takes effect")
    with pytest.raises(ApiException) as info:
        as_nobody.list_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs")
    assert info.value.status == 403


def test_object_owned_by_a_languagemodel_is_garbage_collected(api_client: client.ApiClient,
                                                              custom: client.CustomObjectsApi,
                                                              namespace: str) -> None:
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "metadata": {"name": "owner"},
        "spec": {"model": {"hub": {"id": "gpt2"}}}})
    core = client.CoreV1Api(api_client)
    core.create_namespaced_config_map(namespace, {
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "name": "owner",
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "data": {"k": "v"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "unowned"}})

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "owner",
                                           propagation_policy="Foreground")

    def owned_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        return "owned" not in names

    # The garbage collector discovers new resource types on its own schedule (up to ~30 s).
    eventually(owned_gone, timeout=120, interval=1, what="owned ConfigMap collected")
    eventually(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels")["items"],
               timeout=60, what="foreground deletion of the owner completes")
    assert core.read_namespaced_config_map("unowned", namespace).metadata.name == "unowned"
