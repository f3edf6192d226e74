"""The training configuration stays in step with the TrainingJob CRD: same names, same defaults."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from kubelm_contract.settings import camel
from kubelm_runtime.train.settings import Checkpointing, Dataset, Hyperparameters
from support import REPO

CRD = yaml.safe_load((REPO / "crds" / "trainingjobs.kubelm.io.yaml").read_text())
SPEC = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def _defaults(cls: type) -> dict[str, object]:
    return {camel(f.name): f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_field_names_and_defaults_match() -> None:
    for cls, section in ((Hyperparameters, "hyperparameters"), (Checkpointing, "checkpointing"),
                         (Dataset, "dataset")):
        schema = SPEC[section]["properties"]
        names = {camel(f.name) for f in dataclasses.fields(cls)}
        assert names == set(schema), section
        crd_defaults = {k: v["default"] for k, v in schema.items() if "default" in v}
        python_defaults = {k: v for k, v in _defaults(cls).items() if v is not None}
        assert python_defaults == crd_defaults, section


def test_enums_match() -> None:
    """Both ways: Python accepts exactly the values the CRD allows."""
    hp = SPEC["hyperparameters"]["properties"]
    hints = typing.get_type_hints(Hyperparameters)
    for key, field in (("precision", "precision"), ("lrSchedule", "lr_schedule")):
        assert set(typing.get_args(hints[field])) == set(hp[key]["enum"]), key


LM_CRD = yaml.safe_load((REPO / "crds" / "languagemodels.kubelm.io.yaml").read_text())
LM_SPEC = LM_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_serving_settings_match_the_languagemodel_crd() -> None:
    from kubelm_runtime.serve.settings import Batching, Generation, LimitsSpec, Queue, Responses

    sections = {
        Generation: LM_SPEC["generation"]["properties"],
        LimitsSpec: LM_SPEC["limits"]["properties"],
        Batching: LM_SPEC["batching"]["properties"],
        Queue: LM_SPEC["queue"]["properties"],
        Responses: LM_SPEC["cache"]["properties"]["responses"]["properties"],
    }
    for cls, schema in sections.items():
        names = {camel(f.name) for f in dataclasses.fields(cls)}
        assert names == set(schema), cls.__name__
        crd_defaults = {k: v["default"] for k, v in schema.items() if "default" in v}
        python_defaults = {k: v for k, v in _defaults(cls).items() if v is not None}
        assert python_defaults == crd_defaults, cls.__name__
