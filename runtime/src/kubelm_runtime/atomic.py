"""Directories that appear whole or not at all: checkpoints, the exported model, the best model, a
fetched artifact.

`atomic_directory(final)` yields a staging directory beside `final` (same filesystem; a dot-name
that listings skip). When the block succeeds, every file in it is fsynced, it is renamed to
`final`, and the parent directory is fsynced: after a crash or a power loss, `final` is either the
old complete directory or the new complete one, never a mix. An existing `final` is first renamed
aside (`.<name>.old-<pid>`) and removed once the new one is in place; a crash between those two
renames leaves no `final` and the old copy beside it under its dot-name. When the block raises, the
staging directory is removed; a process killed inside the block leaves it behind
(`.<name>.tmp-*`), which `remove_leftovers` clears.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Makes the directory's entries (renames into it, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(directory))


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        _fsync_tree(staging)
        aside = None
        if final.exists():
            aside = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(staging, final)
        fsync_directory(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(parent: Path, name_pattern: str = "*") -> None:
    """Removes what interrupted `atomic_directory` blocks left in `parent` for names matching the pattern."""
    for pattern in (f".{name_pattern}.tmp-*", f".{name_pattern}.old-*"):
        for leftover in parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
