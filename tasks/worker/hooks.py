"""Worker start-up and shutdown: capabilities, queues, registration, in-flight counting.

Hooked into Celery's signals, so a plain ``celery -A tasks.app worker -Q <pool>``
becomes a flagship worker too: the pool is read from ``FLAGSHIP_POOL`` or from the
queues on the command line, and the worker's direct queue is added before the
consumer starts (never with ``add_consumer`` later: celery #987).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from redis import Redis

from routing import names
from routing.pools import Pool, PoolTable
from routing.registry import Registry
from tasks.sandbox.pool import SandboxPool
from tasks.worker.capabilities import probe_capabilities
from tasks.worker.ref_store import RefStore
from tasks.worker.refusal import refuse
from tasks.worker.settings import WorkerSettings
from tasks.worker.state import WorkerState

log = logging.getLogger(__name__)

_state: WorkerState | None = None
_node: str | None = None


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
    settings = WorkerSettings.from_env()
    pools = PoolTable.load(settings.routing.pools_config)
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or queues)
    pool = _pool_for(consumed, pools, settings.pool)
    if pool is None:
        log.warning("no flagship pool for queues %s: serving plain Celery tasks only", sorted(consumed))
        return
    pool_module = getattr(instance.pool_cls, "__module__", "")
    if not pool_module.endswith((".thread", ".solo")):
        refuse(sender, pool.name, [f"stateful workers need `-P threads` or `-P solo`, not {pool_module} "
                                   "(prefork children would not share the ref store)"])
    redis = Redis.from_url(conf.broker_url, decode_responses=True)
    if Registry(redis, settings.routing).another_run_is_live(sender):
        refuse(sender, pool.name, [f"a live worker already runs as {sender}; give each worker a unique --name"])
    capabilities, failures = probe_capabilities(pool.requires)
    if failures:
        refuse(sender, pool.name, failures)
    for queue in (names.pool_queue(pool.name), names.worker_queue(sender)):
        if queue not in consumed:
            queues.select_add(queue)
    _state = WorkerState(node=sender, pool=pool, settings=settings, redis=redis,
                         concurrency=int(instance.concurrency), capabilities=capabilities)
    install_services(_state)


def install_services(state: WorkerState) -> None:
    """Per-worker objects the operations use: the ref store, and pre-started sandboxes on Deno workers."""
    refs = RefStore(state.node, state.settings.max_refs)
    state.services["refs"] = refs
    state.gauges["refs"] = refs.__len__
    if "deno" in state.capabilities:
        sandbox = state.settings.sandbox
        state.services["sandboxes"] = SandboxPool(
            size=sandbox.pool_size or state.concurrency,  # default: one ready sandbox per thread
            execute_timeout_s=sandbox.execute_timeout_s, heap_mb=sandbox.heap_mb,
        )


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    if _state is not None:
        _state.start()
        log.info("flagship worker %s serving %s (queue %s)", _state.node, _state.pool.name, _state.queue)


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """SIGTERM: stop taking new calls; running ones finish, reserved ones return to their queue."""
    if _state is not None:
        _state.drain()


@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    if _state is not None:
        _state.stop()


@signals.task_received.connect
def _received(request: Any, **_: Any) -> None:
    if _state is None:
        return
    if request.name == names.CALL_TASK and request.args:
        _state.turns.arrive(str(request.args[0]), request.id)
    tag = getattr(request.message, "delivery_tag", None)
    _state.calls.arrived(request.id, None if tag is None else str(tag))


def _finished(task_id: str, task_name: str, args: Any) -> None:
    if _state is None:
        return
    if task_name == names.CALL_TASK and args:
        # Normally the call already left its turn; this covers calls that failed before taking it.
        _state.turns.leave(str(args[0]), task_id)
    _state.calls.finished(task_id)


@signals.task_postrun.connect
def _postrun(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    _finished(task_id, task.name, args)


@signals.task_revoked.connect
def _revoked(request: Any, **_: Any) -> None:
    _finished(request.id, request.name, request.args)
