"""Worker start-up and shutdown: capabilities, queues, registration, in-flight counting.

Hooked into Celery's signals, so a plain ``celery -A tasks.app worker -Q <pool>``
becomes a flagship worker too: the pool is read from ``FLAGSHIP_POOL`` or from the
queues on the command line, and the worker's direct queue is added before the
consumer starts (never with ``add_consumer`` later: celery #987).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer as CeleryConsumer

from routing import names
from routing.broker.brokers import broker_url, same_server
from routing.broker.connect import redis_client
from routing.broker.envelope import configure_unacked_keys
from routing.broker.failures import check_broker
from routing.broker.result_store import ACK_WITH_RESULT
from routing.broker.transport import live_worker
from routing.errors import ServerUnavailable
from routing.fleet.registry import Registry
from routing.pools import Pool, PoolKind, PoolTable
from routing.settings import redact_url
from tasks.lm.dspy_caches import freeze_proxy_environment, preload_prices
from tasks.lm.governor import install as install_lm_governor
from tasks.sandbox.pool import SandboxPool
from tasks.worker.capabilities import probe_capabilities
from tasks.worker.poison import PoisonGuarded
from tasks.worker.programs import ProgramImportFailed, configured_packages, load_catalog
from tasks.worker.ref_store import RefStore
from tasks.worker.refusal import cannot_start, refuse
from tasks.worker.settings import WorkerSettings
from tasks.worker.state import WorkerState
from tasks.worker.turns import SessionTurns, delivery_tag_of, parking

log = logging.getLogger(__name__)

_state: WorkerState | None = None
_node: str | None = None

#: Celery's loggers of the two INFO lines it writes per task ("received", "succeeded"); quiet by default.
TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


class Consumer(PoisonGuarded, CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, poison-proof (:class:`PoisonGuarded`), handing a session's calls to the pool one at
    a time (``tasks.worker.turns.parking``), publishing task events at most every ``event_flush_s``.

    Celery buffers task events and publishes them on the next turn of the event
    loop: under load that is one Redis ``PUBLISH`` (and one kombu publish, the
    largest part of the consumer thread's work) for every one or two events.
    Waiting a few milliseconds batches them. Flower sees every event, that much
    later; the dispatcher still flushes at once when its buffer is full, and on shutdown.
    """

    #: How long an event may wait for others to share its publish.
    event_flush_s = 0.05

    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(on_task_request, *args, **kwargs)
        self.on_task_request = parking(on_task_request, _turns, lambda: getattr(self, "qos", None), names.CALL_TASK)

    #: Until when the scheduled flush is expected (0: none scheduled). Past it, the next event schedules
    #: another: a flush lost with the event loop's timers (a broker reconnect) cannot hold events back.
    _flush_due = 0.0

    # replaces Celery 5.7.0 Consumer.on_send_event_buffered (batched); pinned in tests/test_upstream_seams.py
    def on_send_event_buffered(self) -> None:  # any thread; at worst two flushes get scheduled
        now = time.monotonic()
        if self.hub is not None and now >= self._flush_due:
            self._flush_due = now + 4 * self.event_flush_s
            self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:  # on the event loop's thread
        self.hub.call_later(self.event_flush_s, self._flush_batch)

    def _flush_batch(self) -> None:
        self._flush_due = 0.0  # before flushing: an event buffered from now on schedules the next flush
        self._flush_events()

    # overrides Celery 5.7.0 Consumer.stop; pinned in tests/test_upstream_seams.py
    def stop(self) -> None:
        self._flush_now()
        super().stop()

    # overrides Celery 5.7.0 Consumer.shutdown; pinned in tests/test_upstream_seams.py
    def shutdown(self) -> None:
        self._flush_now()
        super().shutdown()

    def _flush_now(self) -> None:
        try:
            self._flush_events()
        except Exception:  # the broker may be gone; shutting down must go on
            log.debug("could not flush task events", exc_info=True)


@signals.celeryd_init.connect
def _init(conf: Any, **_: Any) -> None:
    """Before the worker is built: our consumer (batched task events)."""
    conf.worker_consumer = f"{__name__}:{Consumer.__name__}"


def tune_worker(conf: Any, task_log: bool) -> None:
    """Per-call costs a worker need not pay; task events stay on (Flower)."""
    if not task_log:
        for name in TASK_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    # One result backend (and Redis connection pool) for all the worker's threads, not one per thread.
    # Safe on a worker: its threads store results, they never wait on Celery's result consumer.
    conf.result_backend_thread_safe = True


def ack_keys(conf: Any) -> dict[str, str] | None:
    """kombu's un-acked keys when a SUCCESS may be acknowledged in the script that stores it, else None.

    Only with late acks, the result backend on the broker's server, and no key prefix (``routing.broker.result_acks``).
    """
    backend = conf.result_backend if isinstance(conf.result_backend, str) else ""
    options = conf.broker_transport_options or {}
    keys = configure_unacked_keys(options)  # the reaper in this worker reads the same keys
    if (not conf.task_acks_late or options.get("global_keyprefix") or "+" not in backend
            or not same_server(conf.broker_url, backend.split("+", 1)[1])):
        return None
    return {"hash": keys.hash, "index": keys.index}


def _turns() -> SessionTurns | None:
    return None if _state is None else _state.turns


def current_worker() -> WorkerState:
    if _state is None:
        raise RuntimeError("this process is not a registered flagship worker")
    return _state


def current_node() -> str | None:
    """This process's Celery node name (set at start-up, flagship pool or not)."""
    return _node


def _pool_for(queues: set[str], pools: PoolTable, configured: str | None) -> Pool | None:
    if configured:
        return pools.get(configured)
    matches = [p for p in pools if names.pool_queue(p.name) in queues]
    return matches[0] if len(matches) == 1 else None


@signals.celeryd_after_setup.connect
def _setup(sender: str, instance: Any, conf: Any, **_: Any) -> None:
    global _state, _node
    _node = sender
    try:  # a wrong password, an unreachable broker, a TLS mismatch: one line and exit, not Celery's retries
        check_broker(conf.broker_url)
    except ServerUnavailable as exc:
        cannot_start(sender, exc)
    settings = WorkerSettings.from_env()
    tune_worker(conf, settings.task_log)
    pools = PoolTable.load(settings.routing.pools_config)
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or queues)
    pool = _pool_for(consumed, pools, settings.pool)
    if pool is None:
        log.warning("no flagship pool for queues %s: serving plain Celery tasks only", sorted(consumed))
        return
    if pool.broker and not same_server(conf.broker_url, broker_url(pool, conf.broker_url)):
        refuse(sender, pool.name, [f"the pool table puts {pool.name} on {redact_url(pool.broker)}, not on this "
                                   f"worker's broker {redact_url(conf.broker_url)} (start it with `flagship worker "
                                   f"--pool {pool.name}`, or set REDIS_URL to the pool's broker)"])
    pool_module = getattr(instance.pool_cls, "__module__", "")
    if not pool_module.endswith((".thread", ".solo")):
        refuse(sender, pool.name, [f"stateful workers need `-P threads` or `-P solo`, not {pool_module} "
                                   "(prefork children would not share the ref store)"])
    redis = redis_client(conf.broker_url, decode_responses=True)
    if Registry(redis, settings.routing).another_run_is_live(sender):
        refuse(sender, pool.name, [f"a live worker already runs as {sender}; give each worker a unique --name"])
    capabilities, failures = probe_capabilities(pool.requires)
    if failures:
        refuse(sender, pool.name, failures)
    try:  # the user's programs, before anything is consumed: all of them or the worker does not start
        programs = load_catalog(configured_packages(os.environ, pool.programs))
    except ProgramImportFailed as exc:
        refuse(sender, pool.name, [str(exc)])
    for queue in (names.pool_queue(pool.name), names.worker_queue(sender)):
        if queue not in consumed:
            queues.select_add(queue)
    conf[ACK_WITH_RESULT] = ack_keys(conf)
    _state = WorkerState(node=sender, pool=pool, settings=settings, redis=redis,
                         concurrency=int(instance.concurrency), capabilities=capabilities, redis_url=conf.broker_url,
                         programs=tuple(programs.module_names()))
    _state.services["programs"] = programs
    install_services(_state)


#: Pre-started sandboxes per RLM worker unless ``FLAGSHIP_SANDBOX_POOL_SIZE`` says (each ~150 MB, ~3.5 s CPU).
DEFAULT_SANDBOXES = 2


def default_sandboxes(concurrency: int) -> int:
    """Few ready sandboxes even on a 64-thread LM worker: the pool starts another on demand."""
    return max(1, min(concurrency, DEFAULT_SANDBOXES))


def install_services(state: WorkerState) -> None:
    """Per-worker objects the operations use: the ref store, and pre-started sandboxes on Deno workers."""
    refs = RefStore(state.node, state.settings.max_refs)
    state.services["refs"] = refs
    state.gauges["refs"] = refs.__len__
    lm = state.settings.lm  # every LM request: fleet cache, fleet-wide limits, usage ledger (tasks.lm.governor)
    state.services["lm_governor"] = install_lm_governor(state.redis, state.pool.name, lm.governor, lm.timeout_s)
    if "deno" in state.capabilities:
        sandbox = state.settings.sandbox
        state.services["sandboxes"] = SandboxPool(
            size=sandbox.pool_size or default_sandboxes(state.concurrency),
            execute_timeout_s=sandbox.execute_timeout_s, heap_mb=sandbox.heap_mb, wasm_mb=sandbox.wasm_mb,
        )


#: Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap(pool: Pool) -> None:
    """Move start-up objects out of the garbage collector's sight, and collect the young less often.

    Modules, DSPy's price table (loaded here on LM pools) and the like never die,
    yet every full collection walks them: 130-250 ms pauses of the whole worker,
    twice in 15 s under load; frozen (``gc.freeze()``), 20-80 ms. A call allocates
    thousands of short-lived objects (freed by reference counting, not by the
    collector): with a higher young threshold the collector runs ~20x less often.
    Together: ~0.3 ms of collector time per LM call down to ~0.1 ms.
    """
    if pool.kind is PoolKind.LM:
        preload_prices()
        freeze_proxy_environment()  # a worker's environment is read once, at start
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), *older)


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    if _state is not None:
        settle_heap(_state.pool)
        _state.start()
        live_worker.set()  # from now on a broker connection loss keeps held calls recorded (they run here)
        log.info("flagship worker %s serving %s (queue %s)", _state.node, _state.pool.name, _state.queue)


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """SIGTERM: stop taking new calls; running ones finish, parked and reserved ones return to their queue."""
    if _state is not None:
        live_worker.clear()  # at the connection's close, kombu returns what was not started to its queue
        _state.turns.stop_releasing()
        _state.drain()


@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    if _state is not None:
        _state.stop()


@signals.task_received.connect
def _received(request: Any, **_: Any) -> None:
    if _state is None:
        return
    tag = getattr(request.message, "delivery_tag", None)
    _state.calls.arrived(request.id, None if tag is None else str(tag))


def _finished(tag: Any) -> None:
    if _state is None:
        return
    tag = None if tag is None else str(tag)
    if tag is not None:
        _state.turns.leave(tag)  # the session's next call gets its turn
    _state.calls.finished(tag)


@signals.task_postrun.connect
def _postrun(task: Any, **_: Any) -> None:
    _finished(delivery_tag_of(task.request))


@signals.task_revoked.connect
def _revoked(request: Any, **_: Any) -> None:  # Celery passes the request's Context
    _finished(delivery_tag_of(request))
