"""Pre-started sandboxes, so an RLM call does not pay the ~2-4 s Deno + Pyodide start.

Each RLM call gets a fresh, isolated interpreter: an interpreter is handed out
once and shut down after use, never returned to the pool. A background thread
starts replacements so ``size`` stay ready.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from routing.errors import SandboxError
from tasks.sandbox.errors import SandboxClosed
from tasks.sandbox.interpreter import (
    SandboxInterpreter,
    default_execute_timeout_s,
    default_heap_mb,
    default_start_timeout_s,
)
from tasks.sandbox.settings import SandboxSettings

__all__ = ["PoolStats", "SandboxPool"]

log = logging.getLogger(__name__)

#: Longest pause between attempts when sandboxes keep failing to start.
max_retry_backoff_s = 30.0
#: How many recent acquire wait times the stats keep.
wait_history_size = 100


@dataclass(frozen=True)
class PoolStats:
    ready: int
    starting: int
    in_use: int
    started_total: int
    start_failures: int
    acquired_total: int
    #: Seconds each recent ``acquire`` waited, oldest first.
    acquire_wait_s: tuple[float, ...]


class SandboxPool:
    """Keeps ``size`` started ``SandboxInterpreter``s ready; thread-safe.

    Pass ``pool.interpreter_factory`` as ``dspy.RLM(..., interpreter_factory=...)``:
    RLM calls it once per forward pass and shuts the interpreter down itself.
    """

    def __init__(
        self,
        size: int = 1,
        execute_timeout_s: float = default_execute_timeout_s,
        heap_mb: int = default_heap_mb,
        *,
        start_timeout_s: float = default_start_timeout_s,
        wasm_mb: int | None = None,
        deno_dir: Path | None = None,
    ) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self.execute_timeout_s = execute_timeout_s
        self.heap_mb = heap_mb
        #: WebAssembly memory cap of each sandbox; None: ``FLAGSHIP_SANDBOX_WASM_MB`` (default 512).
        self.wasm_mb = SandboxSettings.from_env().wasm_mb if wasm_mb is None else wasm_mb
        self.start_timeout_s = start_timeout_s
        self.deno_dir = deno_dir
        self._cond = threading.Condition()
        self._ready: deque[SandboxInterpreter] = deque()
        self._starting = 0
        self._waiting = 0
        self._closed = False
        self._in_use: weakref.WeakSet[SandboxInterpreter] = weakref.WeakSet()
        self._started_total = 0
        self._start_failures = 0
        self._acquired_total = 0
        self._waits_s: deque[float] = deque(maxlen=wait_history_size)
        self._thread = threading.Thread(target=self._refill_forever, name="sandbox-pool", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------

    def acquire(self, timeout_s: float | None = None) -> SandboxInterpreter:
        """A fresh started interpreter, within ``timeout_s`` (default ``start_timeout_s``).

        Takes a ready one; else waits for one the refill thread is already
        starting (two concurrent starts slow each other down); else starts one
        in the caller's thread.
        """
        began = time.monotonic()
        budget_s = self.start_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            self._check_open()
            self._waiting += 1
            try:
                interpreter = self._take_ready()
                while interpreter is None and self._starting >= self._waiting:
                    remaining_s = budget_s - (time.monotonic() - began)
                    if remaining_s <= 0 or not self._cond.wait(remaining_s):
                        break
                    self._check_open()
                    interpreter = self._take_ready()
            finally:
                self._waiting -= 1
            self._cond.notify_all()  # the refill thread may start a replacement
        if interpreter is None:
            interpreter = self._start_now(max(budget_s - (time.monotonic() - began), 1.0))
        with self._cond:
            if self._closed:
                interpreter.shutdown()
                self._check_open()
            self._in_use.add(interpreter)
            self._acquired_total += 1
            self._waits_s.append(time.monotonic() - began)
        return interpreter

    def release(self, interpreter: SandboxInterpreter) -> None:
        """Shut ``interpreter`` down; it is never handed out again."""
        interpreter.shutdown()
        with self._cond:
            self._in_use.discard(interpreter)
            self._cond.notify_all()

    def interpreter_factory(self) -> SandboxInterpreter:
        """Zero-argument factory for ``dspy.RLM``; RLM's own ``shutdown()`` releases it."""
        return self.acquire()

    def wait_ready(self, count: int | None = None, timeout_s: float = 60.0) -> bool:
        """Block until ``count`` (default: ``size``) interpreters are ready; False on timeout."""
        wanted = self.size if count is None else count
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or len(self._ready) >= wanted, timeout=timeout_s) and (
                not self._closed
            )

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                ready=len(self._ready),
                starting=self._starting,
                in_use=sum(1 for interpreter in self._in_use if interpreter.alive),
                started_total=self._started_total,
                start_failures=self._start_failures,
                acquired_total=self._acquired_total,
                acquire_wait_s=tuple(self._waits_s),
            )

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Kill every interpreter, ready or handed out; idempotent."""
        with self._cond:
            self._closed = True
            victims = [*self._ready, *self._in_use]
            self._ready.clear()
            self._cond.notify_all()
        for interpreter in victims:
            interpreter.shutdown()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()

    # -- refill thread -------------------------------------------------------

    def _new(self, start_timeout_s: float) -> SandboxInterpreter:
        return SandboxInterpreter(
            execute_timeout_s=self.execute_timeout_s,
            start_timeout_s=start_timeout_s,
            heap_mb=self.heap_mb,
            wasm_mb=self.wasm_mb,
            deno_dir=self.deno_dir,
        )

    def _take_ready(self) -> SandboxInterpreter | None:
        while self._ready:
            candidate = self._ready.popleft()
            if candidate.alive:
                return candidate
            candidate.shutdown()
        return None

    def _start_now(self, start_timeout_s: float) -> SandboxInterpreter:
        interpreter = self._new(start_timeout_s)
        try:
            interpreter.start()
        except BaseException:
            with self._cond:
                self._start_failures += 1
            raise
        with self._cond:
            self._started_total += 1
        return interpreter

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosed("the sandbox pool is shut down")

    def _refill_forever(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) + self._starting < self.size)
                if self._closed:
                    return
                self._starting += 1
            interpreter = self._new(self.start_timeout_s)
            try:
                interpreter.start()
            except (SandboxError, OSError) as exc:
                failures += 1
                interpreter.shutdown()
                backoff_s = min(max_retry_backoff_s, 0.5 * 2**failures)
                log.warning("sandbox start failed (%s); retrying in %.1f s", exc, backoff_s)
                with self._cond:
                    self._starting -= 1
                    self._start_failures += 1
                    self._cond.notify_all()  # waiting acquirers start their own
                    self._cond.wait_for(lambda: self._closed, timeout=backoff_s)
                continue
            failures = 0
            with self._cond:
                self._starting -= 1
                self._started_total += 1
                if self._closed:
                    interpreter.shutdown()
                    return
                self._ready.append(interpreter)
                self._cond.notify_all()


# dspy.RLM reads the factory's ``execution_instructions`` into the model's prompt;
# a bound method forwards attribute reads to its function.
SandboxPool.interpreter_factory.execution_instructions = SandboxInterpreter.execution_instructions  # type: ignore[attr-defined]
