"""The memory allocator serving workers run on: jemalloc when it is installed.

Every bf16 matrix product on CPU allocates and frees oneDNN descriptors and scratch
buffers. Under glibc's malloc, freeing them consolidates free lists, which made a
product's fixed cost ~17 µs (measured on a 16x768 weight, where the arithmetic is
negligible); under jemalloc it is ~12 µs, and a batch-1 decode step of a GPT-2
124M-shaped model runs ~10 % faster (docs/benchmarks.md). An allocator can only
be swapped before the process starts, so the runtime re-executes itself once with
the library preloaded: the process keeps its PID, arguments and environment.

When it re-executes, the runtime also tells jemalloc to keep the pages it frees (`dirty_decay_ms:-1`)
unless `MALLOC_CONF` is already set (a process started with jemalloc already preloaded keeps what it
was given). With any finite decay (10 s to 10^9 s, with or without background threads or the
oversize arena; all measured), jemalloc 5.3 hands every freed block of about 8 MiB or more back
to the kernel at once, so the next allocation of that size faults each page in again (~3 ms for
9 MiB here). A worker allocates such blocks all the time once contexts grow: each layer's keys and
values are copied to a fresh tensor when the cache grows, drops finished rows or takes new ones, and
a prefill's activations are as large. Kept pages cost no time but hold the worker's resident memory
at its high-water mark, which its memory limit must allow for anyway (docs/benchmarks.md).

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
JEMALLOC_SETTINGS = "dirty_decay_ms:-1"
"""What the runtime sets in MALLOC_CONF for jemalloc when the variable is unset: keep freed pages."""


def preload_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` is preloaded, or None when there is
    nothing to do: the system allocator was asked for, no library is installed, or it is already
    listed (also what stops a second re-execution when the loader could not preload it). A
    MALLOC_CONF already set is kept as it is."""
    choice = environ.get(env.MALLOC, JEMALLOC) or JEMALLOC
    if choice not in CHOICES:
        raise SettingsError(f"{env.MALLOC} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == SYSTEM or library is None:
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if any(Path(entry).name == Path(library).name for entry in preloaded.replace(":", " ").split()):
        return None
    return {"MALLOC_CONF": JEMALLOC_SETTINGS, **environ, "LD_PRELOAD": f"{library} {preloaded}".strip()}


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
    if allocator == JEMALLOC:
        log.info("memory allocator: %s (MALLOC_CONF=%s)", allocator, os.environ.get("MALLOC_CONF") or "-")
    elif not cpu or os.environ.get(env.MALLOC) == SYSTEM:
        log.info("memory allocator: %s", allocator)
    else:
        log.warning("memory allocator: %s (install jemalloc, e.g. the libjemalloc2 package, for faster CPU "
                    "inference)", allocator)
