"""Atomic directories: whole or not at all, and what an interrupted write leaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubelm_runtime.atomic import atomic_directory, remove_leftovers


def test_a_directory_appears_whole_and_replaces_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_directory(final) as staging:
        (staging / "a").write_text("1")
        (staging / "sub").mkdir()
        (staging / "sub" / "b").write_text("2")
        assert not final.exists()  # nothing visible until the block succeeds
    assert (final / "a").read_text() == "1" and (final / "sub" / "b").read_text() == "2"
    with atomic_directory(final) as staging:
        (staging / "c").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copy left


def test_a_failed_write_keeps_the_old_directory_and_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "best"
    with atomic_directory(final) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(final) as staging:
        (staging / "weights").write_text("new, half")
        raise RuntimeError("interrupted")
    assert (final / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_leftovers_of_killed_writers_are_removed(tmp_path: Path) -> None:
    for name in (".step-00000020.tmp-x1", ".step-00000010.old-42", ".other.tmp-1"):
        (tmp_path / name).mkdir()
    remove_leftovers(tmp_path, "step-*")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1"]
