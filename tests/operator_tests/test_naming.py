from __future__ import annotations

import re

import pytest

from kubelm_operator.naming import JOB_NAME_MAX, child_name, label_value

LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_short_names_are_kept_as_they_are() -> None:
    assert child_name("tiny-story", "train") == "tiny-story-train"
    assert label_value("tiny-story") == "tiny-story"


@pytest.mark.parametrize("owner", ["a" * 253, "x.y.z." * 40 + "end", "UPPER.case.dots", "9-starts-with-digit"])
@pytest.mark.parametrize("limit", [63, JOB_NAME_MAX])
def test_long_or_odd_names_fit_and_keep_the_suffix(owner: str, limit: int) -> None:
    name = child_name(owner, "train", limit, start_with_letter=True)
    assert len(name) <= limit and LABEL.match(name) and name[0].isalpha(), name
    assert name.endswith("-train")
    assert name == child_name(owner, "train", limit, start_with_letter=True)


def test_two_long_owners_sharing_a_prefix_get_different_names() -> None:
    first, second = "p" * 80 + "-one", "p" * 80 + "-two"
    assert child_name(first, "train") != child_name(second, "train")
    assert label_value(first) != label_value(second)
    assert len(label_value(first)) <= 63
