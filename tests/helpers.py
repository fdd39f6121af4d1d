"""Helpers shared by tests (conditions to wait on, lookups)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tasks.local.stack import Stack, WorkerProcess


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02,
               what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def worker_by_node(stack: Stack, node: str) -> WorkerProcess:
    return next(w for w in stack.workers if w.node == node)
