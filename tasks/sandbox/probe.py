"""The sandbox self-check: can this machine run Python in a sandbox right now?

The only one: workers run it at start-up (after ``ensure_sandbox_cache``) and
``python -m tasks.sandbox.setup`` runs it after filling the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tasks.sandbox.interpreter import SandboxInterpreter
from tasks.sandbox.paths import INSTALL_HINT, find_deno

__all__ = ["ProbeResult", "probe_sandbox"]

#: The snippet the probe runs, and what it must print.
_PROBE_CODE = "import sys\nprint(sum(range(10)), sys.platform)"
_PROBE_EXPECTED = "45 emscripten"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    #: One line: what worked, or what failed and how to fix it.
    reason: str
    elapsed_s: float


def probe_sandbox(timeout_s: float = 60.0, *, deno_dir: Path | None = None) -> ProbeResult:
    """Find Deno, start a sandbox, run a snippet, check its answer. Never raises."""
    started = time.monotonic()

    def result(ok: bool, reason: str) -> ProbeResult:
        return ProbeResult(ok, " ".join(reason.split()), round(time.monotonic() - started, 3))

    try:
        deno_bin = find_deno()
        interpreter = SandboxInterpreter(execute_timeout_s=timeout_s, start_timeout_s=timeout_s, deno_dir=deno_dir)
        try:
            output = str(interpreter.execute(_PROBE_CODE)).strip()
        finally:
            interpreter.shutdown()
    except Exception as exc:  # a probe reports, it does not raise
        message = str(exc) if INSTALL_HINT in str(exc) else f"{exc}; {INSTALL_HINT}"
        return result(False, f"Deno sandbox unavailable: {type(exc).__name__}: {message}")
    if output != _PROBE_EXPECTED:
        return result(False, f"Deno sandbox printed {output!r}, expected {_PROBE_EXPECTED!r}; {INSTALL_HINT}")
    return result(True, f"Deno sandbox ran Python ({deno_bin})")
