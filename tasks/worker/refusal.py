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


def refuse(node: str, pool: str, reasons: list[str]) -> NoReturn:
    """One clear line, then exit before consuming anything from the pool's queues."""
    message = f"worker {node} refuses to serve {pool}: " + "; ".join(reasons)
    log.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_REFUSED)
