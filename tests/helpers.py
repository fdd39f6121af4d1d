"""Helpers shared by tests (conditions to wait on, lookups)."""

from __future__ import annotations

import os
import shutil
import subprocess
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


def debian_binary(package: str, find: Callable[[], str | None], timeout_s: float) -> str:
    """``find()``'s binary, installing Debian's ``package`` with apt-get when missing (skips if that cannot be)."""
    found = find()
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"{package} is not installed and apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                pytest.skip(f"could not install {package} ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing {package} took more than {timeout_s} s")
    found = find()
    if not found:
        pytest.skip(f"apt-get installed {package} but no {package} binary is on PATH")
    return found
