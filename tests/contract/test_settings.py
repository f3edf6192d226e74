from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from kubelm_contract.settings import SettingsError, camel, dump, load, snake


@dataclass(frozen=True)
class Inner:
    max_length: int = 8
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    ratio: float = 0.5
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_camel_and_snake_are_inverse() -> None:
    for name in ("max_length", "gradient_accumulation_steps", "id"):
        assert snake(camel(name)) == name
    assert camel("max_new_tokens") == "maxNewTokens"


def test_load_and_dump_round_trip() -> None:
    data = {"name": "x", "inner": {"maxLength": 16, "mode": "b"}, "ratio": 1, "tags": ["t"], "limit": 3}
    loaded = load(Outer, data)
    assert loaded == Outer("x", Inner(16, "b"), 1.0, ["t"], 3)
    assert isinstance(loaded.ratio, float)
    assert dump(loaded) == {**data, "ratio": 1.0}


@pytest.mark.parametrize(("data", "message"), [
    ({}, "name: required setting is missing"),
    ({"name": "x", "inner": {"maxLenght": 1}}, "inner.maxLenght: unknown setting (did you mean 'maxLength'?)"),
    ({"name": "x", "inner": {"mode": "c"}}, "inner.mode: 'c' is not one of 'a', 'b'"),
    ({"name": "x", "ratio": "high"}, "ratio: expected a number"),
    ({"name": "x", "inner": {"maxLength": True}}, "inner.maxLength: expected an integer"),
    ({"name": "x", "tags": "t"}, "tags: expected a list"),
    ({"name": 3}, "name: expected a string"),
    ([1, 2], "document: expected a mapping"),
])
def test_errors_name_the_path(data: object, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(Outer, data)
    assert message in str(info.value)
