"""Capabilities a worker proves at start-up before it may serve a pool."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


def _probe_deno() -> tuple[bool, str]:
    """Fill the sandbox cache if needed (idempotent), then run the one self-check: Python in a real sandbox."""
    try:
        from tasks.sandbox.paths import INSTALL_HINT
        from tasks.sandbox.probe import probe_sandbox
        from tasks.sandbox.setup import ensure_sandbox_cache
    except ImportError as exc:  # pragma: no cover - packaging error
        return False, f"sandbox support is not installed ({exc})"
    try:
        ensure_sandbox_cache()
    except Exception as exc:  # reported as the reason the worker refuses the pool
        return False, f"sandbox cache could not be prepared: {' '.join(str(exc).split())}; {INSTALL_HINT}"
    result = probe_sandbox()
    return result.ok, result.reason


#: Capability name -> probe returning (ok, reason).
PROBES: dict[str, Callable[[], tuple[bool, str]]] = {"deno": _probe_deno}


def probe_capabilities(required: Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """Run the probes of ``required``; returns (proven capabilities, failure lines)."""
    proven, failures = [], []
    for name in required:
        probe = PROBES.get(name)
        if probe is None:
            failures.append(f"no probe for capability {name!r}")
            continue
        ok, reason = probe()
        if ok:
            proven.append(name)
            log.info("capability %s: ok (%s)", name, reason)
        else:
            failures.append(f"capability {name!r} missing: {reason}")
    return tuple(proven), failures
