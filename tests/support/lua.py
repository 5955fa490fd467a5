"""Running an Argo CD resource health check (Lua) the way Argo CD does: the resource as the
global ``obj`` (JSON null is nil), the script's body as a function returning ``hs``.

Argo CD embeds gopher-lua, a Lua 5.1. The interpreter used here, in this order: the ``lupa``
package (its Lua 5.1 build when it has one), else a ``lua5.1``, ``luajit``, ``lua5.4`` or ``lua``
binary (Debian: ``apt-get install lua5.1``). ``interpreter()`` is None when there is none.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from deployment_cleanup.spec import API_VERSION, KIND

HealthCheck = Callable[[str, dict[str, Any]], tuple[str, str]]
BINARIES = ("lua5.1", "luajit", "lua5.4", "lua")


def lua_literal(value: Any) -> str:
    """A Lua table constructor for a JSON-like value (arrays are 1-based tables)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _lua_string(value)
    if isinstance(value, list | tuple):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        items = (f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not JSON-like: {value!r}")


def _lua_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '\\"':
            escaped.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127:
            escaped.append(f"\\{ord(char):03d}")  # Lua's decimal escape
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _chunk(script: str, obj: dict[str, Any]) -> str:
    return (
        f"obj = {lua_literal(obj)}\nlocal function health()\n{script}\nend\nlocal hs = health()\n"
    )


def _with_lupa() -> HealthCheck | None:
    for module in ("lupa.lua51", "lupa"):
        try:
            lupa = importlib.import_module(module)
        except ImportError:
            continue

        def run(script: str, obj: dict[str, Any], lupa: Any = lupa) -> tuple[str, str]:
            runtime = lupa.LuaRuntime()
            status, message = runtime.execute(_chunk(script, obj) + "return hs.status, hs.message")
            return str(status), str(message)

        return run
    return None


def _with_binary() -> HealthCheck | None:
    binary = next((found for b in BINARIES if (found := shutil.which(b))), None)
    if binary is None:
        return None

    def run(script: str, obj: dict[str, Any]) -> tuple[str, str]:
        chunk = _chunk(script, obj) + 'io.write(hs.status, "\\n", hs.message)'
        result = subprocess.run(
            [binary, "-"], input=chunk, capture_output=True, text=True, check=True, timeout=30
        )
        status, _, message = result.stdout.partition("\n")
        return status, message

    return run


def interpreter() -> HealthCheck | None:
    """A function ``(script, obj) -> (hs.status, hs.message)``, or None without a Lua."""
    return _with_lupa() or _with_binary()


def cleanup_object(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A DeploymentCleanup as the API server returns it, for health checks."""
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "nightly", "namespace": "platform", "generation": generation},
        "spec": {"mode": "Plan"},
    }
    if status is not None:
        obj["status"] = status
    return obj
