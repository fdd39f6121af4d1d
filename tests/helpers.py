"""Helpers shared by tests (conditions to wait on, lookups)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_service(env: dict[str, str]) -> Iterator[str]:
    """examples/service.py under uvicorn with ``env`` on a free port: its base URL, once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.service:app", "--port", str(port),
                             "--log-level", "warning"], cwd=Path(__file__).resolve().parents[1], env=env,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, "uvicorn exited"
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout_s=60, what="the service to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@contextmanager
def started_workers(stack: Stack, pools: list[str], env: dict[str, str] | None = None) -> Iterator[list[WorkerProcess]]:
    """A worker of each of ``pools`` (a pool named twice: two), started together, stopped at the end."""
    workers = [stack.start_worker(pool, wait=False, env=env) for pool in pools]
    try:
        stack.wait_ready(workers)
        yield workers
    finally:
        for worker in workers:
            worker.stop()
