"""Worker start-up and shutdown: capabilities, queues, registration, in-flight counting.

Hooked into Celery's signals, so a plain ``celery -A tasks.app worker -Q <pool>``
becomes a flagship worker too: the pool is read from ``FLAGSHIP_POOL`` or from the
queues on the command line, and the worker's direct queue is added before the
consumer starts (never with ``add_consumer`` later: celery #987).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import signals
from redis import Redis

from routing import names
from routing.pools import Pool, PoolTable
from routing.registry import Registry
from routing.settings import Settings
from tasks.capabilities import probe_capabilities
from tasks.refs import RefStore, default_max_refs
from tasks.worker_state import WorkerState

log = logging.getLogger(__name__)

#: Exit status of a worker that refuses to serve its pool: missing capability, wrong pool type,
#: duplicate node name (EX_CONFIG).
EXIT_REFUSED = 78

_state: WorkerState | None = None
_node: str | None = None


def current_worker() -> WorkerState:
    if _state is None:
        raise RuntimeError("this process is not a registered flagship worker")
    return _state


def node_name() -> str | None:
    return _node


def _pool_for(queues: set[str], pools: PoolTable) -> Pool | None:
    name = os.environ.get("FLAGSHIP_POOL")
    if name:
        return pools.get(name)
    matches = [p for p in pools if names.pool_queue(p.name) in queues]
    return matches[0] if len(matches) == 1 else None


@signals.celeryd_after_setup.connect
def _setup(sender: str, instance: Any, conf: Any, **_: Any) -> None:
    global _state, _node
    _node = sender
    settings = Settings.from_env()
    pools = PoolTable.load(settings.pools_config)
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or queues)
    pool = _pool_for(consumed, pools)
    if pool is None:
        log.warning("no flagship pool for queues %s: serving plain Celery tasks only", sorted(consumed))
        return
    pool_module = getattr(instance.pool_cls, "__module__", "")
    if not pool_module.endswith((".thread", ".solo")):
        _refuse(sender, pool, [f"stateful workers need `-P threads` or `-P solo`, not {pool_module} "
                               "(prefork children would not share the ref store)"])
    redis = Redis.from_url(conf.broker_url, decode_responses=True)
    if Registry(redis, settings).another_run_is_live(sender):
        _refuse(sender, pool, [f"a live worker already runs as {sender}; give each worker a unique --name"])
    capabilities, failures = probe_capabilities(pool.requires)
    if failures:
        _refuse(sender, pool, failures)
    for queue in (names.pool_queue(pool.name), names.worker_queue(sender)):
        if queue not in consumed:
            queues.select_add(queue)
    _state = WorkerState(node=sender, pool=pool, settings=settings, redis=redis,
                         concurrency=int(instance.concurrency), capabilities=capabilities)
    install_services(_state)


def install_services(state: WorkerState) -> None:
    """Per-worker objects the operations use: the ref store (and the sandbox pool on RLM workers)."""
    refs = RefStore(state.node, int(os.environ.get("FLAGSHIP_MAX_REFS", default_max_refs)))
    state.services["refs"] = refs
    state.gauges["refs"] = refs.__len__
    if "deno" in state.capabilities:
        from tasks.rlm_ops import install_sandbox_pool

        install_sandbox_pool(state)


def _refuse(node: str, pool: Pool, reasons: list[str]) -> None:
    """One clear line, then exit before consuming anything from the pool's queues."""
    message = f"worker {node} refuses to serve {pool.name}: " + "; ".join(reasons)
    log.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_REFUSED)


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
    _state.call_arrived(request.id, None if tag is None else str(tag))


def _finished(task_id: str, task_name: str, args: Any) -> None:
    if _state is None:
        return
    if task_name == names.CALL_TASK and args:
        # Normally the call already left its turn; this covers calls that failed before taking it.
        _state.turns.leave(str(args[0]), task_id)
    _state.call_finished(task_id)


@signals.task_postrun.connect
def _postrun(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    _finished(task_id, task.name, args)


@signals.task_revoked.connect
def _revoked(request: Any, **_: Any) -> None:
    _finished(request.id, request.name, request.args)
