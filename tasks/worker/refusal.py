"""A worker that must not serve its pool says why in one line and exits with one status.

Kept apart from the Celery hooks so a process manager can read the status
without connecting any signal handlers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

#: Exit status of a worker that refuses to serve its pool: missing capability, wrong pool type,
#: duplicate node name (EX_CONFIG).
EXIT_REFUSED = 78
#: Exit status of a worker (or CLI command) whose broker cannot be used: unreachable, wrong password,
#: TLS mismatch (EX_UNAVAILABLE).
EXIT_UNAVAILABLE = 69


def _exit(message: str, status: int) -> NoReturn:
    """The message once: through the worker's logging when Celery set it up, else on stderr."""
    if log.hasHandlers():
        log.critical(message)
    else:
        print(message, file=sys.stderr, flush=True)
    os._exit(status)


def refuse(node: str, pool: str, reasons: list[str]) -> NoReturn:
    """One clear line, then exit before consuming anything from the pool's queues."""
    _exit(f"worker {node} refuses to serve {pool}: " + "; ".join(reasons), EXIT_REFUSED)


def cannot_start(node: str, reason: object) -> NoReturn:
    """The broker cannot be used (``reason``: a ``ServerUnavailable``, URL masked): one line, then exit."""
    _exit(f"worker {node} cannot start: {reason}", EXIT_UNAVAILABLE)
