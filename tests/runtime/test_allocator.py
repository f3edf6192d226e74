"""Which allocator the runtime re-executes with (pure), and that the check of its own map works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubelm_contract import env
from kubelm_contract.settings import SettingsError
from kubelm_runtime import allocator

LIBRARY = "libjemalloc.so.2"


def test_jemalloc_is_preloaded_by_default() -> None:
    environment = allocator.preload_environment({"PATH": "/bin"}, LIBRARY)
    assert environment == {"PATH": "/bin", "LD_PRELOAD": LIBRARY, "MALLOC_CONF": allocator.JEMALLOC_SETTINGS}


def test_freed_pages_are_kept_unless_settings_are_given() -> None:
    assert allocator.JEMALLOC_SETTINGS == "dirty_decay_ms:-1"
    environment = allocator.preload_environment({"MALLOC_CONF": "narenas:2"}, LIBRARY)
    assert environment is not None and environment["MALLOC_CONF"] == "narenas:2"


def test_other_preloads_are_kept() -> None:
    environment = allocator.preload_environment({"LD_PRELOAD": "/opt/libtrace.so"}, LIBRARY)
    assert environment is not None and environment["LD_PRELOAD"] == f"{LIBRARY} /opt/libtrace.so"


@pytest.mark.parametrize("preload", [LIBRARY, f"/usr/lib/x86_64-linux-gnu/{LIBRARY}", f"/opt/a.so:{LIBRARY}"])
def test_no_second_reexecution_once_listed(preload: str) -> None:
    # Also what ends the loop when the loader could not preload it: the variable is still set.
    assert allocator.preload_environment({"LD_PRELOAD": preload}, LIBRARY) is None


def test_system_allocator_on_request_or_without_the_library() -> None:
    assert allocator.preload_environment({env.MALLOC: "system"}, LIBRARY) is None
    assert allocator.preload_environment({}, None) is None


def test_unknown_choice_is_a_configuration_error() -> None:
    with pytest.raises(SettingsError, match="KUBELM_MALLOC must be one of jemalloc, system"):
        allocator.preload_environment({env.MALLOC: "tcmalloc"}, LIBRARY)


def test_jemalloc_keeps_large_freed_blocks_for_reuse_as_configured(tmp_path: Path) -> None:
    """A 9 MiB block freed and allocated again 20 times: with the runtime's settings its pages stay
    mapped, so only the first allocation faults its ~2300 pages in (with jemalloc 5.3's own settings
    every one does: docs/benchmarks.md)."""
    library = allocator.find_jemalloc()
    if library is None:
        pytest.skip("jemalloc is not installed (devcluster/scripts/setup.sh installs it)")
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    environment = {**os.environ, "LD_PRELOAD": library, "MALLOC_CONF": allocator.JEMALLOC_SETTINGS}
    done = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True,
                          check=True)
    assert float(done.stdout) < 300  # faults per allocation: the first one's ~2300, spread over 20


CHURN = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 9 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_this_process_allocator_is_read_from_its_map() -> None:
    preloaded = "libjemalloc" in os.environ.get("LD_PRELOAD", "")
    assert allocator.in_use() == (allocator.JEMALLOC if preloaded else allocator.SYSTEM)
