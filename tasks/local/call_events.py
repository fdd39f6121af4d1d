"""Call latency and outcomes for Prometheus, from Celery's task events (the stream Flower reads).

By pool and operation (the task's shadow name, :mod:`routing.fleet.task_view`), and for
program calls by program path too (``program='package.module:Name'`` in the call's args).
Workers do no extra work for it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis import Redis
from redis.exceptions import RedisError

from routing import names
from routing.fleet import task_view

log = logging.getLogger(__name__)

#: Call latency buckets (s): a ping takes milliseconds, an RLM run minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Distinct operation labels kept; more (a producer inventing names) are counted as ``other``.
MAX_OPERATIONS = 200
#: A program call's path in its args repr (``program='package.module:Name'``).
_PROGRAM_ARG = re.compile(r"program='([\w.]+:\w+)'")
#: Calls received but not yet finished that are remembered (the oldest are forgotten first).
MAX_PENDING = 100_000
#: How long an unknown node's pool is not looked up again.
UNKNOWN_NODE_RETRY_S = 10.0



class CallEvents:
    """Call latency and outcomes from Celery's task events, by pool and operation (one stream per broker)."""

    def __init__(self, registry: CollectorRegistry, redis: Redis, *others: Redis) -> None:
        self.redis = redis
        #: Every broker's client, the default first: a node's pool is registered on its own broker.
        self.brokers = (redis, *others)
        self.duration = Histogram("flagship_call_duration_seconds", "Time a call ran on its worker",
                                  ["pool", "operation"], buckets=BUCKETS, registry=registry)
        self.calls = Counter("flagship_calls", "Calls finished, by outcome (succeeded, failed)",
                             ["pool", "operation", "outcome"], registry=registry)
        self.program_calls = Counter("flagship_program_calls", "Program calls finished, by program path and outcome",
                                     ["pool", "program", "outcome"], registry=registry)
        self.program_duration = Histogram("flagship_program_call_duration_seconds",
                                          "Time a program call ran on its worker", ["pool", "program"],
                                          buckets=BUCKETS, registry=registry)
        self.programs: set[str] = set()
        self.pending: OrderedDict[str, list[Any]] = OrderedDict()
        self.operations: set[str] = set()
        self.node_pools: dict[str, tuple[str, float]] = {}
        self.receivers: list[Any] = []

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        return {"task-received": self.on_received, "task-started": self.on_started,
                "task-succeeded": self.on_succeeded, "task-failed": self.on_failed}

    def pool_of(self, node: str | None) -> str:
        if not node:
            return "unknown"
        cached = self.node_pools.get(node)
        if cached and (cached[0] != "unknown" or time.monotonic() < cached[1]):
            return cached[0]
        pool = "unknown"
        for redis in self.brokers:
            try:
                pool = redis.hget(names.DIRECT_QUEUES_KEY, node) or "unknown"
            except RedisError:
                continue
            if pool != "unknown":
                break
        self.node_pools[node] = (str(pool), time.monotonic() + UNKNOWN_NODE_RETRY_S)
        return str(pool)

    def on_received(self, event: dict[str, Any]) -> None:
        operation = task_view.operation_of(event.get("name"))
        if operation is None or not event.get("uuid"):
            return
        if operation not in self.operations:
            if len(self.operations) >= MAX_OPERATIONS:
                operation = "other"
            else:
                self.operations.add(operation)
        self.pending[event["uuid"]] = [operation, self.pool_of(event.get("hostname")), None,
                                       self.program_of(operation, event.get("args"))]
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)

    def program_of(self, operation: str, args: Any) -> str | None:
        """The program path a program call's args show (``program='pkg.mod:Name'``), bounded like operations."""
        found = _PROGRAM_ARG.search(args) if operation.startswith("program.") and isinstance(args, str) else None
        if found is None:
            return None
        program = found.group(1)
        if program not in self.programs:
            if len(self.programs) >= MAX_OPERATIONS:
                return "other"
            self.programs.add(program)
        return program

    def on_started(self, event: dict[str, Any]) -> None:
        entry = self.pending.get(event.get("uuid", ""))
        if entry is not None:
            entry[2] = event.get("timestamp")

    def on_succeeded(self, event: dict[str, Any]) -> None:
        entry = self.pending.pop(event.get("uuid", ""), None)
        if entry is not None:
            self.observe(entry, "succeeded", event.get("runtime"))

    def on_failed(self, event: dict[str, Any]) -> None:
        entry = self.pending.pop(event.get("uuid", ""), None)
        if entry is not None:
            started, ended = entry[2], event.get("timestamp")
            self.observe(entry, "failed", ended - started if started and ended else None)

    def observe(self, entry: list[Any], outcome: str, runtime: Any) -> None:
        operation, pool, _, program = entry
        self.calls.labels(pool, operation, outcome).inc()
        if program is not None:
            self.program_calls.labels(pool, program, outcome).inc()
        if isinstance(runtime, int | float):
            self.duration.labels(pool, operation).observe(max(0.0, float(runtime)))
            if program is not None:
                self.program_duration.labels(pool, program).observe(max(0.0, float(runtime)))

    def run(self, app: Celery, stop: threading.Event) -> None:
        """Consume ``app``'s broker's task events until ``stop``; reconnects after any error (a broker restart)."""
        while not stop.is_set():
            try:
                with app.connection_for_read() as conn:
                    receiver = app.events.Receiver(conn, handlers=self.handlers())
                    self.receivers.append(receiver)
                    if stop.is_set():
                        return
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:  # the thread must survive anything; the scrape says if Redis is gone
                if stop.is_set():
                    return
                log.warning("task events: %s; reconnecting", exc)
                stop.wait(1.0)

    def stop(self) -> None:
        for receiver in self.receivers:
            receiver.should_stop = True
