"""``flagship metrics``: the fleet and its calls for Prometheus, on ``/metrics`` (prometheus-client).

Two sources, both real and cheap:

* on every scrape, Redis (:mod:`routing.fleet.gauges`): pools, live workers, bound
  sessions, refs and in-flight calls per worker, the depth of every shared and
  direct queue, the dead-letter list (a few pipelined round trips); and, at most
  every ``sessions_every_s``, the session records with their rehydration counts;
* Celery's task events, the stream Flower reads: call latency and outcomes by
  pool and operation. The operation is the task's shadow name
  (:mod:`routing.fleet.task_view`), the pool the one the worker node registered under.
  Workers do no extra work for it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError

from routing import names
from routing.broker.brokers import by_broker
from routing.broker.celery_config import celery_config
from routing.broker.connect import redis_client
from routing.broker.embedded import resolve_url
from routing.errors import ServerUnavailable
from routing.fleet import gauges, task_view
from routing.pools import PoolTable
from routing.settings import Settings, redact_url

log = logging.getLogger(__name__)

#: Call latency buckets (s): a ping takes milliseconds, an RLM run minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Distinct operation labels kept; more (a producer inventing names) are counted as ``other``.
MAX_OPERATIONS = 200
#: Calls received but not yet finished that are remembered (the oldest are forgotten first).
MAX_PENDING = 100_000
#: How long an unknown node's pool is not looked up again.
UNKNOWN_NODE_RETRY_S = 10.0


def _family(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def fleet_families(fleet: gauges.FleetGauges, sessions: gauges.SessionGauges) -> Iterator[Metric]:
    """The gauges of one scrape."""
    pools = fleet.pools
    yield _family("flagship_pool_size", "Workers a pool is configured to run", ["pool", "affinity"],
                  [([p.name, p.affinity], p.size) for p in pools])
    yield _family("flagship_pool_live_workers", "Live workers (heartbeat present) per pool", ["pool"],
                  [([p.name], p.live_workers) for p in pools])
    yield _family("flagship_pool_registered_workers", "Registered workers per pool, live or not yet reaped",
                  ["pool"], [([p.name], p.workers) for p in pools])
    rows = [(w.info.pool, w.info.node, w) for w in fleet.workers]
    per_worker: list[tuple[str, str, Callable[[gauges.WorkerGauges], float]]] = [
        ("flagship_worker_live", "1 while the worker's heartbeat key exists", lambda w: int(w.info.live)),
        ("flagship_worker_sessions", "Sessions bound to the worker", lambda w: w.info.sessions),
        ("flagship_worker_refs", "Refs (LMs, modules, contexts) held in the worker's memory", lambda w: w.refs),
        ("flagship_worker_in_flight_calls", "Calls the worker is running or holds", lambda w: w.info.in_flight),
        ("flagship_worker_concurrency", "The worker's threads", lambda w: w.info.concurrency),
        ("flagship_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat",
         lambda w: w.info.heartbeat_age_s or 0.0),
    ]
    for name, doc, value in per_worker:
        yield _family(name, doc, ["pool", "worker"], [([pool, node], value(w)) for pool, node, w in rows])
    yield _family("flagship_queue_depth", "Calls waiting in a queue (shared: the pool's; direct: one worker's)",
                  ["pool", "queue", "kind"], [([q.pool, q.queue, q.kind], q.depth) for q in fleet.queues])
    yield _family("flagship_deadletter_messages", f"Messages in the dead-letter list {names.DEADLETTER_KEY}",
                  [], [([], fleet.deadletter)])
    events = CounterMetricFamily(
        "flagship_reliability_events", "What the fleet did to lose nothing: dead_lettered, answered_from_store, "
        "reruns (possible duplicate executions), resent, orphans_requeued", labels=["event"])
    for event, count in sorted(fleet.reliability.items()):
        events.add_metric([event], count)
    yield events
    known = sorted({p.name for p in pools} | set(sessions.sessions))
    yield _family("flagship_sessions", "Open sessions per pool", ["pool"],
                  [([p], sessions.sessions.get(p, 0)) for p in known])
    yield _family("flagship_session_rehydrations", "Rehydrations recorded on the open sessions of a pool",
                  ["pool"], [([p], sessions.rehydrations.get(p, 0)) for p in known])


@dataclass
class Broker:
    """One broker the metrics read: its URL (password masked), a client, the pools on it."""

    shown: str
    redis: Redis
    pools: PoolTable
    sessions: tuple[float, gauges.SessionGauges] | None = None


class FleetCollector:
    """Reads every broker on each scrape (sessions at most every ``sessions_every_s``)."""

    def __init__(self, brokers: list[Broker], settings: Settings, sessions_every_s: float = 30.0) -> None:
        self.brokers, self.settings = brokers, settings
        self.sessions_every_s = sessions_every_s

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration

    def sessions(self, broker: Broker) -> gauges.SessionGauges:
        now = time.monotonic()
        if broker.sessions is None or now - broker.sessions[0] >= self.sessions_every_s:
            broker.sessions = (now, gauges.sessions(broker.redis))
        return broker.sessions[1]

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("flagship_redis_up", "1 when this scrape could read the fleet from every broker")
        broker_up = GaugeMetricFamily("flagship_broker_up", "1 when this scrape could read the broker",
                                      labels=["broker"])
        fleets, sessions = [], []
        for broker in self.brokers:
            try:
                fleet, counted = gauges.fleet(broker.redis, self.settings, broker.pools), self.sessions(broker)
                fleets.append(fleet)
                sessions.append(counted)
                broker_up.add_metric([broker.shown], 1)
            except Exception as exc:  # a scrape answers whatever happens: with the broker's up at 0
                log.warning("scrape: cannot read the fleet from %s: %s", broker.shown, exc,
                            exc_info=not isinstance(exc, RedisError))
                broker_up.add_metric([broker.shown], 0)
        up.add_metric([], int(len(fleets) == len(self.brokers)))
        yield up
        if len(self.brokers) > 1:  # pools on their own brokers: which is where, and how each one is
            yield broker_up
            yield _family("flagship_pool_broker", "1 for the broker each pool lives on", ["pool", "broker"],
                          [([p.name, b.shown], 1) for b in self.brokers for p in b.pools])
        if fleets:
            yield from fleet_families(gauges.merged(fleets), gauges.merged_sessions(sessions))


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
        self.pending[event["uuid"]] = [operation, self.pool_of(event.get("hostname")), None]
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)

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
        operation, pool, _ = entry
        self.calls.labels(pool, operation, outcome).inc()
        if isinstance(runtime, int | float):
            self.duration.labels(pool, operation).observe(max(0.0, float(runtime)))

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


def broker_url(settings: Settings, wait_s: float) -> str:
    """``REDIS_URL`` or the recorded embedded server, waiting for it (under a Procfile both start together)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return resolve_url(settings)
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def serve(port: int, address: str, settings: Settings | None = None, *, wait_s: float = 30.0,
          sessions_every_s: float = 30.0) -> int:
    """Serve ``/metrics`` until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or Settings.from_env()
    pools = PoolTable.load(settings.pools_config)
    url = broker_url(settings, wait_s)
    brokers, apps = [], []
    for broker, table in by_broker(pools, url):  # the default broker, then each pool's own
        redis = redis_client(broker, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        brokers.append(Broker(redact_url(broker), redis, table))
        app = Celery("flagship-metrics", set_as_current=False)
        app.conf.update(celery_config(settings, broker))
        apps.append(app)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(FleetCollector(brokers, settings, sessions_every_s))
    events = CallEvents(registry, *(b.redis for b in brokers))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, _ = start_http_server(port, addr=address, registry=registry)
    for app in apps:
        threading.Thread(target=events.run, args=(app, stop), name="flagship-events", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics (brokers %s)", address, port,
             ", ".join(b.shown for b in brokers))
    stop.wait()
    events.stop()
    server.shutdown()
    log.info("metrics stopped")
    return 0
