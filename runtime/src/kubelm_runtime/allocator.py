"""The memory allocator serving workers run on: jemalloc when it is installed.

Every bf16 matrix product on CPU allocates and frees oneDNN descriptors and scratch
buffers. Under glibc's malloc, freeing them consolidates free lists, which made a
product's fixed cost ~17 µs (measured on a 16x768 weight, where the arithmetic is
negligible); under jemalloc it is ~12 µs, and a batch-1 decode step of a GPT-2
124M-shaped model runs ~10 % faster (docs/benchmarks.md). An allocator can only
be swapped before the process starts, so the runtime re-executes itself once with
the library preloaded: the process keeps its PID, arguments and environment.

`KUBELM_MALLOC=system` keeps the system allocator. Training keeps it too: the training
benchmark ran slower on jemalloc, and only on par with its page decay turned off.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from kubelm_contract import env
from kubelm_contract.settings import SettingsError

log = logging.getLogger(__name__)

JEMALLOC = "jemalloc"
SYSTEM = "system"
CHOICES = (JEMALLOC, SYSTEM)


def preload_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` is preloaded, or None when there is
    nothing to do: the system allocator was asked for, no library is installed, or it is already
    listed (also what stops a second re-execution when the loader could not preload it)."""
    choice = environ.get(env.MALLOC, JEMALLOC) or JEMALLOC
    if choice not in CHOICES:
        raise SettingsError(f"{env.MALLOC} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == SYSTEM or library is None:
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if any(Path(entry).name == Path(library).name for entry in preloaded.replace(":", " ").split()):
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def find_jemalloc() -> str | None:
    """The loader name of an installed jemalloc (e.g. libjemalloc.so.2), found as the loader finds it."""
    return ctypes.util.find_library("jemalloc")


def in_use() -> str:
    """Which allocator this process runs on, read from its own memory map."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return JEMALLOC if "libjemalloc" in maps else SYSTEM


def reexec_with_jemalloc() -> None:
    """Replaces this process by itself with jemalloc preloaded, when that applies; returns otherwise."""
    if not sys.platform.startswith("linux"):
        return
    environment = preload_environment(os.environ, find_jemalloc())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def report(cpu: bool) -> None:
    """Logs the allocator in use, with the remedy when a CPU worker misses jemalloc."""
    allocator = in_use()
    if allocator == JEMALLOC or not cpu or os.environ.get(env.MALLOC) == SYSTEM:
        log.info("memory allocator: %s", allocator)
    else:
        log.warning("memory allocator: %s (install jemalloc, e.g. the libjemalloc2 package, for faster CPU "
                    "inference)", allocator)
