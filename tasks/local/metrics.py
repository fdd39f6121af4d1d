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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from celery import Celery
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from redis import Redis
from redis.exceptions import RedisError

from routing import names
from routing.broker.brokers import by_broker
from routing.broker.celery_config import celery_config
from routing.broker.connect import redis_client
from routing.broker.embedded import resolve_url
from routing.errors import ServerUnavailable
from routing.fleet import gauges, usage
from routing.pools import PoolTable
from routing.settings import Settings, redact_url
from tasks.local.call_events import CallEvents

log = logging.getLogger(__name__)

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
    # Every call not started yet, where it waits: a queue in Redis, or held by a worker for its session's turn
    # (worker "" for a pool's shared queue). The sum per pool is what autoscaling should follow.
    direct = {q.queue: q.depth for q in fleet.queues if q.kind == "direct"}
    waiting = [([q.pool, "", "queue"], float(q.depth)) for q in fleet.queues if q.kind == "shared"]
    for pool, node, w in rows:
        waiting += [([pool, node, "queue"], float(direct.get(w.info.queue, 0))), ([pool, node, "held"], w.info.held)]
    yield _family("flagship_calls_waiting", "Calls not started yet: in a queue, or held by a worker for their "
                  "session's turn", ["pool", "worker", "where"], waiting)
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


def lm_families(rows: list[tuple[str, str, dict[str, str]]]) -> Iterator[Metric]:
    """The LM usage ledger (``routing.fleet.usage``): calls, tokens, cost, cache hits, waits by pool and model."""
    labels = ["pool", "model"]
    calls = CounterMetricFamily("flagship_lm_calls", "LM calls (cache hits included)", labels=labels)
    tokens = CounterMetricFamily("flagship_lm_tokens", "Tokens the provider reported", labels=[*labels, "kind"])
    cost = CounterMetricFamily("flagship_lm_cost_usd", "Provider cost (DSPy's / LiteLLM's; 0 where unknown)",
                               labels=labels)
    hits = CounterMetricFamily("flagship_lm_cache_hits", "LM calls answered by the LM cache", labels=labels)
    waits = SummaryMetricFamily("flagship_lm_limit_wait_seconds", "Time LM requests waited for fleet capacity "
                                "(limits, 429 pauses)", labels=labels)
    for pool, model, raw in rows:
        found = usage.totals(raw)
        calls.add_metric([pool, model], found["calls"])
        tokens.add_metric([pool, model, "prompt"], found["prompt_tokens"])
        tokens.add_metric([pool, model, "completion"], found["completion_tokens"])
        cost.add_metric([pool, model], found["cost_usd"])
        hits.add_metric([pool, model], found["cache_hits"])
        waits.add_metric([pool, model], count_value=int(float(raw.get("limit_waits") or 0)),
                         sum_value=float(raw.get("limit_wait_s") or 0))
    yield from (calls, tokens, cost, hits, waits)


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
        fleets, sessions, lm_rows = [], [], []
        for broker in self.brokers:
            try:
                fleet, counted = gauges.fleet(broker.redis, self.settings, broker.pools), self.sessions(broker)
                fleets.append(fleet)
                sessions.append(counted)
                lm_rows += usage.pool_rows(broker.redis)
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
            yield from lm_families(lm_rows)


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
