"""The Helm chart (charts/kubelm) against the kustomize install it mirrors.

With default values `helm template` must render the objects `kubectl kustomize manifests/install`
renders, field for field; each value must change only what it is for. helm comes from the pinned
Go module (devcluster/scripts/build-helm.sh, cached), kubectl from the control plane build.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import REPO, ClusterEnv

CHART = REPO / "charts" / "kubelm"
NAMESPACE = "kubelm-system"
CONNECTIONS = "kubelm-connections"

Key = tuple[str, str, str, str]
Objects = dict[Key, dict[str, Any]]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers, as the apiserver reads them: kustomize writes 5e-05, which YAML 1.1
    (PyYAML's default) reads as a string while helm's verbatim 5.0e-05 reads as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse(text: str) -> Objects:
    docs = [d for d in yaml.load_all(text, Loader=_Loader) if d]
    objects = {(d.get("apiVersion", ""), d.get("kind", ""), d.get("metadata", {}).get("namespace", ""),
                d.get("metadata", {}).get("name", "")): d for d in docs}
    assert len(objects) == len(docs), "two rendered objects share apiVersion, kind, namespace and name"
    return objects


def _label(key: Key) -> str:
    api_version, kind, namespace, name = key
    return f"{kind} {namespace + '/' if namespace else ''}{name} ({api_version})"


def assert_same(actual: Objects, expected: Objects) -> None:
    """Equal object sets; otherwise a message naming missing and extra objects and a diff of each changed one."""
    problems = [f"missing: {_label(k)}" for k in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {_label(k)}" for k in sorted(actual.keys() - expected.keys())]
    for key in sorted(expected.keys() & actual.keys()):
        if actual[key] != expected[key]:
            diff = difflib.unified_diff(
                yaml.safe_dump(expected[key], sort_keys=True).splitlines(),
                yaml.safe_dump(actual[key], sort_keys=True).splitlines(),
                "expected", "rendered", lineterm="", n=2,
            )
            problems.append(f"differs: {_label(key)}\n" + "\n".join(diff))
    assert not problems, "\n\n".join(problems)


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the pinned helm with its config, cache and data in a scratch directory (never the user's)."""
    script = REPO / "devcluster" / "scripts" / "build-helm.sh"
    built = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
    binary = Path(built.stdout.strip().splitlines()[-1]) / "helm"
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env |= {"HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
    return run


@pytest.fixture(scope="module")
def render(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., Objects]:
    def run(*args: str, namespace: str = NAMESPACE) -> Objects:
        result = helm("template", "kubelm", str(CHART), "--namespace", namespace, "--include-crds", *args)
        assert result.returncode == 0, result.stderr
        return parse(result.stdout)
    return run


def _kustomize(overlay: str) -> Objects:
    from kubelm_devcluster import cli

    kubectl = cli.binaries_dir() / "kubectl"
    result = subprocess.run([str(kubectl), "kustomize", str(REPO / "manifests" / overlay)],
                            capture_output=True, text=True, check=True, timeout=120)
    return parse(result.stdout)


@pytest.fixture(scope="module")
def kustomized() -> Objects:
    return _kustomize("install")


@pytest.fixture(scope="module")
def defaults(render: Callable[..., Objects]) -> Objects:
    return render()


def _deployment(objects: Objects) -> dict[str, Any]:
    return objects[("apps/v1", "Deployment", NAMESPACE, "kubelm-operator")]


def _container(objects: Objects) -> dict[str, Any]:
    containers = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def _env(objects: Objects) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(objects)["env"]}


def test_helm_is_the_pinned_release(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    pinned = re.search(r"^require helm\.sh/helm/v4 (v\S+)$", (REPO / "tools" / "helm" / "go.mod").read_text(), re.M)
    assert pinned
    result = helm("version", "--template", "{{ .Version }}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pinned.group(1)


def test_lint_strict_passes(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_the_kustomize_install(defaults: Objects, kustomized: Objects) -> None:
    assert_same(defaults, kustomized)


def test_crds_are_the_repository_crds_and_only_them(defaults: Objects) -> None:
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve()
    on_disk = parse("---\n".join(p.read_text() for p in sorted((REPO / "crds").glob("*.kubelm.io.yaml"))))
    rendered = {k: v for k, v in defaults.items() if k[1] == "CustomResourceDefinition"}
    assert_same(rendered, on_disk)
    assert not [k for k in defaults if k[1] == "Kustomization"]


def test_package_carries_the_crds_as_files(helm: Callable[..., subprocess.CompletedProcess[str]],
                                           tmp_path: Path) -> None:
    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "kubelm-0.1.0.tgz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        crds = sorted(n for n in members if n.startswith("kubelm/crds/"))
        assert crds == [f"kubelm/crds/{p.name}" for p in sorted((REPO / "crds").glob("*.kubelm.io.yaml"))]
        for name in crds:
            assert members[name].isfile()
            extracted = archive.extractfile(members[name])
            assert extracted is not None
            assert extracted.read() == (REPO / "crds" / Path(name).name).read_bytes()


def _expect(defaults: Objects, edit: Callable[[Objects], None]) -> Objects:
    expected = copy.deepcopy(defaults)
    edit(expected)
    return expected


def test_operator_image(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        _container(o)["image"] = "registry.example/kubelm/operator:1.2.3"
        _container(o)["imagePullPolicy"] = "IfNotPresent"
    rendered = render("--set", "image.repository=registry.example/kubelm/operator", "--set", "image.tag=1.2.3",
                      "--set", "image.pullPolicy=IfNotPresent")
    assert_same(rendered, _expect(defaults, edit))


def test_image_tags_default_to_the_app_version(defaults: Objects) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert _container(defaults)["image"] == f"kubelm/operator:{app_version}"
    assert _env(defaults)["KUBELM_RUNTIME_IMAGE"] == f"kubelm/runtime:{app_version}"


def test_runtime_image(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        env = _container(o)["env"]
        assert env[0]["name"] == "KUBELM_RUNTIME_IMAGE"
        env[0]["value"] = "registry.example/runtime:gpu-7"
    rendered = render("--set", "runtimeImage.repository=registry.example/runtime", "--set", "runtimeImage.tag=gpu-7")
    assert_same(rendered, _expect(defaults, edit))


def test_connection_urls_go_into_the_secret(render: Callable[..., Objects], defaults: Objects) -> None:
    urls = {"KUBELM_REDIS_URL": "rediss://:pw@redis.example:6380/2",
            "KUBELM_AMQP_URL": "amqps://u:p@mq.example:5671/kubelm",
            "KUBELM_RABBITMQ_API_URL": "https://u:p@mq.example:15671",
            "KUBELM_MEMCACHED_URL": "memcached://cache.example:11211"}

    def edit(o: Objects) -> None:
        o[("v1", "Secret", NAMESPACE, CONNECTIONS)]["stringData"] = urls
    rendered = render("--set", f"connections.redisUrl={urls['KUBELM_REDIS_URL']}",
                      "--set", f"connections.amqpUrl={urls['KUBELM_AMQP_URL']}",
                      "--set", f"connections.rabbitmqApiUrl={urls['KUBELM_RABBITMQ_API_URL']}",
                      "--set", f"connections.memcachedUrl={urls['KUBELM_MEMCACHED_URL']}")
    assert_same(rendered, _expect(defaults, edit))


def test_existing_secret_replaces_the_chart_secret(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        del o[("v1", "Secret", NAMESPACE, CONNECTIONS)]
        assert _container(o)["envFrom"] == [{"secretRef": {"name": CONNECTIONS}}]
        _container(o)["envFrom"] = [{"secretRef": {"name": "my-connections"}}]
    rendered = render("--set", "connections.existingSecret=my-connections")
    assert_same(rendered, _expect(defaults, edit))


def test_watch_namespaces(render: Callable[..., Objects], defaults: Objects) -> None:
    assert "KUBELM_NAMESPACES" not in _env(defaults)

    def edit(o: Objects) -> None:
        _container(o)["env"].append({"name": "KUBELM_NAMESPACES", "value": "a,b"})
    assert_same(render("--set-json", 'watchNamespaces=["a","b"]'), _expect(defaults, edit))
    assert_same(render("--set-json", "watchNamespaces=[]"), defaults)


def test_log_format(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        _container(o)["env"][1] = {"name": "KUBELM_LOG_FORMAT", "value": "text"}
    assert_same(render("--set", "logFormat=text"), _expect(defaults, edit))


def test_resources_merge_into_the_defaults(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        _container(o)["resources"] = {"requests": {"cpu": "500m", "memory": "1Gi"},
                                      "limits": {"cpu": "2"}}
    rendered = render("--set", "resources.requests.cpu=500m", "--set", "resources.requests.memory=1Gi",
                      "--set-string", "resources.limits.cpu=2", "--set", "resources.limits.memory=null")
    assert_same(rendered, _expect(defaults, edit))


def test_scheduling(render: Callable[..., Objects], defaults: Objects) -> None:
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}

    def edit(o: Objects) -> None:
        pod = _deployment(o)["spec"]["template"]["spec"]
        pod |= {"tolerations": tolerations, "nodeSelector": {"pool": "system"}, "affinity": affinity}
    rendered = render("--set-json", f"tolerations={json.dumps(tolerations)}",
                      "--set", "nodeSelector.pool=system",
                      "--set-json", f"affinity={json.dumps(affinity)}")
    assert_same(rendered, _expect(defaults, edit))


def test_high_availability_is_the_kustomize_ha_install(render: Callable[..., Objects]) -> None:
    assert_same(render("--set", "highAvailability.enabled=true"), _kustomize("install-ha"))


def test_high_availability_replicas(render: Callable[..., Objects], defaults: Objects) -> None:
    expected = render("--set", "highAvailability.enabled=true")
    _deployment(expected)["spec"]["replicas"] = 3
    assert_same(render("--set", "highAvailability.enabled=true", "--set", "highAvailability.replicas=3"), expected)
    # Replicas alone change nothing: one replica without the Lease stays the only safe single mode.
    assert_same(render("--set", "highAvailability.replicas=3"), defaults)


def test_create_namespace_off(render: Callable[..., Objects], defaults: Objects) -> None:
    def edit(o: Objects) -> None:
        del o[("v1", "Namespace", "", NAMESPACE)]
    assert_same(render("--set", "createNamespace=false"), _expect(defaults, edit))


def test_release_namespace_is_used_throughout(render: Callable[..., Objects], defaults: Objects) -> None:
    def moved(obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = "ops"
        elif obj["metadata"].get("namespace") == NAMESPACE:
            obj["metadata"]["namespace"] = "ops"
        for subject in obj.get("subjects", []):
            subject["namespace"] = "ops"
        return obj
    expected = {(k[0], k[1], "ops" if k[2] else "", "ops" if k[1] == "Namespace" else k[3]): moved(v)
                for k, v in defaults.items()}
    assert_same(render(namespace="ops"), expected)


@pytest.mark.parametrize(("args", "message"), [
    (("--set", "logFormat=yaml"), "at '/logFormat': value must be one of 'text', 'json'"),
    (("--set-json", 'watchNamespaces="a,b"'), "at '/watchNamespaces': got string, want array"),
    (("--set-json", 'watchNamespaces=["a,b"]'), "at '/watchNamespaces/0'"),
    (("--set", "image.tag=12"), "at '/image/tag': got number, want string"),
    (("--set", "watchNamespace=a"), "additional properties 'watchNamespace' not allowed"),
    (("--set", "connections.redisUrl=localhost:6379"), "at '/connections/redisUrl'"),
    (("--set", "createNamespace=maybe"), "at '/createNamespace': got string, want boolean"),
    (("--set", "highAvailability.enabled=true", "--set", "highAvailability.replicas=1"),
     "at '/highAvailability/replicas': minimum: got 1, want 2"),
])
def test_bad_values_are_refused(helm: Callable[..., subprocess.CompletedProcess[str]],
                                args: tuple[str, ...], message: str) -> None:
    result = helm("template", "kubelm", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode != 0, f"accepted: {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_lint_refuses_bad_values_too(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("lint", "--strict", str(CHART), "--set", "logFormat=yaml")
    assert result.returncode != 0
    assert "/logFormat" in result.stdout + result.stderr


def test_kubernetes_too_old_is_refused(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("template", "kubelm", str(CHART), "--kube-version", "v1.29.0")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("args", [(), ("--set", "connections.existingSecret=mine", "--set-json",
                                       'watchNamespaces=["team-*","b"]', "--set", "logFormat=text"),
                                  ("--set", "highAvailability.enabled=true")],
                         ids=["defaults", "own-secret", "high-availability"])
def test_the_apiserver_accepts_the_render(helm: Callable[..., subprocess.CompletedProcess[str]],
                                          cluster: ClusterEnv, namespace: str, args: tuple[str, ...]) -> None:
    """A server-side dry run: admission and the real schemas of every kind, CRDs included. The
    release namespace is a fresh existing one, since a dry run creates no Namespace for what follows."""
    result = helm("template", "kubelm", str(CHART), "--namespace", namespace, "--include-crds", *args)
    assert result.returncode == 0, result.stderr
    applied = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=kubelm-chart-tests",
                              "-f", "-", input=result.stdout).stdout
    lines = [line for line in applied.splitlines() if line.strip()]
    assert len(lines) == len(parse(result.stdout)), applied
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), applied
