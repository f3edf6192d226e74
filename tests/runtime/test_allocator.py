"""Which allocator the runtime re-executes with (pure), and that the check of its own map works."""

from __future__ import annotations

import os

import pytest

from kubelm_contract import env
from kubelm_contract.settings import SettingsError
from kubelm_runtime import allocator

LIBRARY = "libjemalloc.so.2"


def test_jemalloc_is_preloaded_by_default() -> None:
    environment = allocator.preload_environment({"PATH": "/bin"}, LIBRARY)
    assert environment == {"PATH": "/bin", "LD_PRELOAD": LIBRARY}


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


def test_this_process_allocator_is_read_from_its_map() -> None:
    preloaded = "libjemalloc" in os.environ.get("LD_PRELOAD", "")
    assert allocator.in_use() == (allocator.JEMALLOC if preloaded else allocator.SYSTEM)
