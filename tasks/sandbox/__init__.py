"""Deno + Pyodide code sandboxes for ``dspy.RLM``: setup, interpreter, pool, probe, bench.

Names are imported lazily so ``python -m tasks.sandbox.setup`` (and the cheap
probe import in worker start-up) does not load DSPy before it needs to.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PoolStats", "ProbeResult", "SandboxInterpreter", "SandboxPool", "ensure_sandbox_cache", "probe_sandbox"]

_HOMES = {
    "PoolStats": "tasks.sandbox.pool",
    "ProbeResult": "tasks.sandbox.probe",
    "SandboxInterpreter": "tasks.sandbox.interpreter",
    "SandboxPool": "tasks.sandbox.pool",
    "ensure_sandbox_cache": "tasks.sandbox.setup",
    "probe_sandbox": "tasks.sandbox.probe",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
