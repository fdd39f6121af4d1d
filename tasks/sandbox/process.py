"""Child-process plumbing for sandboxes: spawn tied to the parent, kill by group, a pausable clock.

Why a spawner thread: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked
the child exits, not the process. A sandbox started from a short-lived thread
(a pool's helper, a request thread) would be killed as soon as that thread
ends. Every Deno process is therefore forked by one long-lived daemon thread
per Python process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

__all__ = ["Watchdog", "kill_process_group", "spawn"]

_PR_SET_PDEATHSIG = 1
#: How long to wait for a SIGKILLed process to be reaped.
reap_timeout_s = 5.0


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)  # loaded before fork: dlopen is not fork-safe


def _die_with(parent_pid: int, libc: ctypes.CDLL | None) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Spawner:
    """The one thread that forks sandboxes in this process (re-created after os.fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner_pid: int | None = None
        self._queue: queue.SimpleQueue[tuple[Future[subprocess.Popen[str]], list[str], dict[str, str]]]
        self._libc = _libc()

    def popen(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        with self._lock:
            if self._owner_pid != os.getpid():
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._loop, args=(self._queue,), name="sandbox-spawner", daemon=True).start()
                self._owner_pid = os.getpid()
            jobs = self._queue
        future: Future[subprocess.Popen[str]] = Future()
        jobs.put((future, command, env))
        return future.result()

    def _loop(self, jobs: queue.SimpleQueue) -> None:
        while True:
            future, command, env = jobs.get()
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    encoding="UTF-8",
                    env=env,
                    start_new_session=True,  # own process group: one killpg ends it all
                    preexec_fn=_die_with(os.getpid(), self._libc),
                )
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)
            else:
                future.set_result(process)


_SPAWNER = _Spawner()


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``command`` with text pipes, in its own process group, killed if this process dies."""
    return _SPAWNER.popen(command, env)


def kill_process_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL the process's group (safe from any thread; a no-op once it has exited)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()  # not yet the group leader (still between fork and setsid)
    try:
        process.wait(timeout=reap_timeout_s)
    except subprocess.TimeoutExpired:
        pass


class Watchdog:
    """A wall-clock budget that calls ``on_expire`` once when spent; it can pause (during host tool calls)."""

    def __init__(self, on_expire: Callable[[], None]) -> None:
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._remaining_s = 0.0
        self._resumed_at = 0.0
        self._armed = False
        self.fired = False

    def arm(self, budget_s: float) -> None:
        with self._lock:
            self._cancel()
            self.fired = False
            self._armed = True
            self._remaining_s = budget_s
            self._schedule()

    def pause(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._cancel()
                self._remaining_s -= time.monotonic() - self._resumed_at

    def resume(self) -> None:
        with self._lock:
            if self._armed and self._timer is None and not self.fired:
                self._schedule()

    def disarm(self) -> None:
        with self._lock:
            self._cancel()
            self._armed = False

    def _schedule(self) -> None:
        self._resumed_at = time.monotonic()
        self._timer = threading.Timer(max(self._remaining_s, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        with self._lock:
            if self._timer is None or threading.current_thread() is not self._timer:
                return  # cancelled or re-armed meanwhile
            self.fired = True
            self._timer = None
        self._on_expire()
