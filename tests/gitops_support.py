"""What Argo CD and kstatus (Flux) say about a kubelm object, for tests (importable as `gitops_support`).

`argocd_health` runs manifests/gitops/argocd/health.lua in a real Lua 5.1, with the libraries Argo CD
gives a custom health check; `kstatus` runs sigs.k8s.io/cli-utils' status.Compute through the
tools/kstatus program, which devcluster/scripts/build-kstatus.sh builds once into the cache.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51

from support import REPO

ARGOCD_DIR = REPO / "manifests" / "gitops" / "argocd"
HEALTH_SCRIPTS = {"TrainingJob": ARGOCD_DIR / "health.lua", "LanguageModel": ARGOCD_DIR / "health.lua"}
BUILD_KSTATUS = REPO / "devcluster" / "scripts" / "build-kstatus.sh"
ARGOCD_STATUSES = frozenset({"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"})
KSTATUS_STATUSES = frozenset({"Current", "InProgress", "Failed", "Terminating", "NotFound", "Unknown"})

# Argo CD opens only package, base, table and a safe os (time, date) for scripts from argocd-cm;
# everything else goes, the string metatable too, so a script that would fail there fails here.
_ARGOCD_SANDBOX = """
debug.setmetatable("", nil)
for _, name in ipairs({"string", "math", "io", "debug", "coroutine", "python"}) do
  _G[name] = nil
  package.loaded[name] = nil
end
gcinfo = nil
os = {time = os.time, date = os.date}
package.loaded.os = os
"""


class GitopsCheckError(AssertionError):
    """A health script or the kstatus program did not answer as it must."""


def _to_lua(runtime: Any, value: Any) -> Any:
    """As Argo CD's decodeValue: objects become tables, lists arrays from 1, numbers Lua numbers."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise GitopsCheckError(f"object keys must be strings: {list(value)}")
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise GitopsCheckError(f"not a JSON value: {value!r}")


def _field(table: Any, name: str, script: Path) -> str:
    value = table[name]
    if not isinstance(value, str):
        raise GitopsCheckError(f"{script.name}: hs.{name} must be a string, got {value!r}")
    return value


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """{"status", "message"} as Argo CD would show them for `obj` (a whole object, status included)."""
    kind = obj.get("kind")
    if kind not in HEALTH_SCRIPTS:
        raise GitopsCheckError(f"no Argo CD health script for kind {kind!r}")
    script = HEALTH_SCRIPTS[kind]
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    chunk, error = runtime.eval("function(s, n) local f, e = loadstring(s, n); return f or false, e end")(
        script.read_text(), "@" + script.name)
    if not chunk:
        raise GitopsCheckError(f"{script.name} does not compile: {error}")
    runtime.execute(_ARGOCD_SANDBOX)
    runtime.globals().obj = _to_lua(runtime, obj)
    try:
        hs = chunk()
    except lua51.LuaError as e:
        raise GitopsCheckError(f"{script.name} failed on {kind} {obj['metadata'].get('name')}: {e}") from e
    if lua51.lua_type(hs) != "table":
        raise GitopsCheckError(f"{script.name} must return a table, returned {hs!r}")
    result = {"status": _field(hs, "status", script), "message": _field(hs, "message", script)}
    if result["status"] not in ARGOCD_STATUSES:
        raise GitopsCheckError(f"{script.name}: {result['status']!r} is not an Argo CD health status")
    if obj["metadata"].get("deletionTimestamp"):
        # Argo CD's own rule, whatever the script says: an object being deleted is Progressing
        # (the wording of the message varies between Argo CD releases).
        return {"status": "Progressing", "message": "Pending deletion"}
    return result


@functools.cache
def kstatus_binary() -> Path:
    """The kstatus program, built by devcluster/scripts/build-kstatus.sh (instant once cached)."""
    built = subprocess.run(["bash", str(BUILD_KSTATUS)], capture_output=True, text=True, timeout=600)
    if built.returncode:
        raise GitopsCheckError(f"{BUILD_KSTATUS.name} failed ({built.returncode}): {built.stderr[-2000:]}")
    lines = built.stdout.strip().splitlines()
    binary = Path(lines[-1]) / "kstatus" if lines else None
    if binary is None or not os.access(binary, os.X_OK):
        raise GitopsCheckError(f"{BUILD_KSTATUS.name} printed no directory holding kstatus: {built.stdout!r}")
    return binary


def kstatus(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """kstatus's {"status", "message"} for each object, in order."""
    ran = subprocess.run([str(kstatus_binary())], input=json.dumps(objects), capture_output=True, text=True,
                         timeout=60)
    if ran.returncode:
        raise GitopsCheckError(f"kstatus failed ({ran.returncode}): {ran.stderr.strip()}")
    lines = ran.stdout.splitlines()
    if len(lines) != len(objects):
        raise GitopsCheckError(f"kstatus answered {len(lines)} lines for {len(objects)} objects: {ran.stdout!r}")
    results = []
    for line in lines:
        parsed = json.loads(line)
        if not (isinstance(parsed, dict) and set(parsed) == {"status", "message"}
                and all(isinstance(v, str) for v in parsed.values()) and parsed["status"] in KSTATUS_STATUSES):
            raise GitopsCheckError(f"kstatus answered an unexpected line: {line!r}")
        results.append(parsed)
    return results
