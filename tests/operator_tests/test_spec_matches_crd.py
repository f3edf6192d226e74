"""The typed specs walk the CRDs' schemas field by field: names, defaults, enums, nesting."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from kubelm_contract.settings import SettingsError, camel
from kubelm_operator.spec import LanguageModelSpec, TrainingJobSpec, parse_languagemodel, parse_trainingjob
from support import REPO


def _spec_schema(crd: str) -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "crds" / f"{crd}.kubelm.io.yaml").read_text())
    return dict(loaded["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X, tuple[X, ...] -> X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _unwrap(options[0]) if len(options) == 1 else tp
    if get_origin(tp) in (tuple, list):
        return _unwrap(get_args(tp)[0])
    return tp


def _literal_values(tp: Any) -> set[Any]:
    tp = _unwrap(tp)
    return set(get_args(tp)) if get_origin(tp) is Literal else set()


def _walk(cls: type, schema: dict[str, Any], where: str, seen: list[str]) -> None:
    properties = schema["properties"]
    hints = typing.get_type_hints(cls)
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}
    assert set(fields) == set(properties), where
    for key, field in fields.items():
        sub, tp = properties[key], hints[field.name]
        seen.append(f"{where}.{key}")
        if "enum" in sub:
            assert _literal_values(tp) == set(sub["enum"]), f"{where}.{key}"
        if "default" in sub and not isinstance(sub["default"], dict):
            assert field.default == sub["default"], f"{where}.{key}"
        elif field.default is not dataclasses.MISSING and field.default is not None:
            assert sub.get("default") == field.default, f"{where}.{key}"
        inner = _unwrap(tp)
        if dataclasses.is_dataclass(inner):
            _walk(inner, sub["items"] if sub.get("type") == "array" else sub, f"{where}.{key}", seen)  # type: ignore[arg-type]


def test_trainingjob_spec_walks_the_whole_crd_schema() -> None:
    seen: list[str] = []
    _walk(TrainingJobSpec, _spec_schema("trainingjobs"), "spec", seen)
    assert "spec.baseModel.trainingJobRef.name" in seen and "spec.tolerations.tolerationSeconds" in seen


def test_languagemodel_spec_walks_the_whole_crd_schema() -> None:
    seen: list[str] = []
    _walk(LanguageModelSpec, _spec_schema("languagemodels"), "spec", seen)
    assert {"spec.model.trainingJobRef.name", "spec.queue.deletionPolicy", "spec.cache.responses.ttlSeconds",
            "spec.autoscaling.scaleDownStabilizationSeconds", "spec.gateway.authSecretRef.key"} <= set(seen)


def test_every_sample_parses() -> None:
    for path in sorted((REPO / "manifests" / "samples").glob("trainingjob-*.yaml")):
        spec = parse_trainingjob(yaml.safe_load(path.read_text())["spec"])
        assert spec.dataset.train.startswith("pvc://"), path
    for path in sorted((REPO / "manifests" / "samples").glob("languagemodel-*.yaml")):
        model = parse_languagemodel(yaml.safe_load(path.read_text())["spec"])
        assert model.autoscaling.min_replicas <= model.autoscaling.max_replicas, path


@pytest.mark.parametrize(("spec", "message"), [
    ({"dataset": {"train": "/d"}}, "spec.baseModel: required setting is missing"),
    ({"baseModel": {"hub": {"id": "gpt2"}, "uri": "/m"}, "dataset": {"train": "/d"}},
     "spec.baseModel: needs exactly one of hub, uri or trainingJobRef"),
    ({"baseModel": {"uri": "/m"}, "dataset": {"train": "/d"}, "workerz": 2}, "spec.workerz: unknown setting"),
    ({"baseModel": {"uri": "pvc:///x"}, "dataset": {"train": "/d"}}, "spec.baseModel.uri: 'pvc:///x'"),
])
def test_what_the_crd_cannot_catch_is_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_trainingjob(spec).claims()


@pytest.mark.parametrize(("spec", "message"), [
    ({"model": {"uri": "/m", "hub": {"id": "gpt2"}}}, "spec.model: needs exactly one of hub, uri or trainingJobRef"),
    ({"model": {"uri": "/m"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling: minReplicas must not exceed maxReplicas"),
    ({"model": {"uri": "/m"}, "generation": {"maxNewTokens": 600}},
     "spec.generation.maxNewTokens must not exceed spec.limits.maxNewTokens"),
    ({"model": {"uri": "/m"}, "gateway": {"authSecretRef": {}}}, "spec.gateway.authSecretRef.name: required"),
])
def test_languagemodel_spec_errors_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_languagemodel(spec)
