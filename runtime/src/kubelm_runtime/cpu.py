"""What this machine's CPU is fast at, for training's and serving's precision choices."""

from __future__ import annotations

from pathlib import Path


def _cpuinfo(given: str | None) -> str:
    """The text given, or /proc/cpuinfo's; empty where it cannot be read."""
    if given is not None:
        return given
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of /proc/cpuinfo (or of the text given); empty where it cannot be read."""
    return set(_cpuinfo(cpuinfo).split())


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU."""
    return bool(cpu_flags(cpuinfo) & {"amx_bf16", "avx512_bf16"})


def cpu_model(cpuinfo: str | None = None) -> str:
    """The processor's name from /proc/cpuinfo ("unknown" where it cannot be read)."""
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"
