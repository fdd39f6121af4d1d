"""Where a session's calls go: the routing decision, dispatch, waiting, rehydration and close.

The router works on a :class:`Binding`, the small value a session handle holds
(its pool, affinity and the worker run holding its state). It reads the
producer's cached worker view (:class:`~routing.producer.watch.WorkerWatch`),
so a strict call costs the same Redis work as a plain Celery ``send_task``.
``strict_fail_fast`` is the exception: it reads the worker's in-flight count
fresh, one round trip, by definition.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from celery import Celery
from kombu.exceptions import EncodeError
from redis import Redis

from routing import names, tracing
from routing.broker import claims
from routing.broker.connect import follows_sentinel
from routing.errors import CallTimeout, InvalidArgument, PoolSaturated, SessionWorkerUnavailable, WorkerBusy
from routing.fleet import recipes, task_view
from routing.fleet.registry import Liveness, Registry
from routing.fleet.sessions import SessionStore
from routing.pools import Affinity, PoolTable
from routing.producer.binding import Binding, Sent, Waiting, redacted_argsrepr
from routing.producer.publish import Publisher
from routing.producer.recovery.backlog import Backlog
from routing.producer.recovery.deadlines import UNTIMED_OPS, DeadlineSweeper, start_by
from routing.producer.recovery.lanes import Lanes
from routing.producer.recovery.unconfirmed import UnconfirmedSends, maybe_applied
from routing.producer.results.listener import ResultListener
from routing.producer.slots import DirectSlots, direct_hold_intervals
from routing.producer.watch import WorkerWatch

log = logging.getLogger(__name__)

#: Each recipe replayed during a rehydration must finish within this long.
rehydrate_call_timeout_s = 120.0


class Router:
    def __init__(self, app: Celery, redis: Redis, sessions: SessionStore, registry: Registry,
                 watch: WorkerWatch, pools: PoolTable, results: ResultListener,
                 claim_threshold_bytes: int = claims.default_threshold_bytes) -> None:
        self.claim_threshold_bytes = claim_threshold_bytes
        self.app = app
        self.redis = redis
        self.publisher = Publisher(app, redis)
        self.sessions = sessions
        self.registry = registry
        self.watch = watch
        self.pools = pools
        self.results = results
        #: Where this producer's hint sessions sit on workers' direct queues.
        self.direct_slots = DirectSlots(hold_s=direct_hold_intervals * watch.interval_s)
        self.lanes = Lanes()
        self.backlog = Backlog(redis)
        self.deadlines = DeadlineSweeper(results.redis, results.fail_where)
        #: Calls whose push failed after it may have been applied (``routing.producer.recovery.unconfirmed``).
        self.unconfirmed = UnconfirmedSends(redis, self.publisher, results.settle_stored, results.fail_where)
        #: s1: with Sentinel, strict calls keep their arguments too, so a failover sweep can resend them.
        self.keep_strict_args = follows_sentinel(redis)

    # -- binding --------------------------------------------------------------

    def bind(self, binding: Binding, prefer: str | None = None) -> None:
        """Keep a usable binding, else bind to the least-loaded live worker of the pool."""
        node, incarnation = self.sessions.bind(binding.session_id, self.pools.get(binding.pool), binding.affinity,
                                               binding.ttl_s, prefer=prefer)
        self._adopt(binding, node, incarnation)

    def _adopt(self, binding: Binding, node: str, incarnation: str) -> None:
        """Point the binding at its (new) worker run and start watching it."""
        binding.worker, binding.incarnation = node, incarnation
        self._watch_run(binding.pool, node, incarnation)

    def _watch_run(self, pool: str, node: str, incarnation: str) -> None:
        concurrency = self.pools.get(pool).concurrency
        self.watch.watch(node, Liveness(live=True, in_flight=0, concurrency=concurrency, incarnation=incarnation))

    def follow(self, binding: Binding) -> None:
        """Start watching the worker an attached session is bound to."""
        if binding.worker:
            self.watch.watch(binding.worker)
            self.watch.refresh()

    def ran_on(self, binding: Binding, node: str | None) -> None:
        """A hint call ran elsewhere (the shared queue): the session now lives there."""
        if node and node != binding.worker and binding.affinity is Affinity.HINT:
            binding.worker = node
            self.watch.watch(node)

    # -- the routing decision and dispatch -------------------------------------

    def route(self, binding: Binding) -> str | None:
        """The node to send to (its direct queue), or None for the pool's shared queue."""
        if binding.worker is None:
            with binding.lock:
                if binding.worker is None:
                    self.bind(binding)
        node = binding.worker
        assert node is not None
        view = self.watch.get(node)
        if binding.affinity is Affinity.HINT:
            # A slot of the bound worker held by the session or free on top of the view (see DirectSlots), and
            # room in its direct queue (max_queued), else the shared queue, where the first free worker takes it.
            placed = (view is not None and self.backlog.has_room(names.worker_queue(node))
                      and self.direct_slots.take(node, binding.session_id, view))
            return node if placed else None
        if view is None or not binding.holds_state_on(view):
            raise SessionWorkerUnavailable(binding.session_id, node)
        if binding.affinity is Affinity.STRICT_FAIL_FAST:
            fresh = self.registry.liveness([node])[node]
            if not binding.holds_state_on(fresh):
                raise SessionWorkerUnavailable(binding.session_id, node)
            if fresh.saturated:
                raise WorkerBusy(binding.session_id, node, fresh.in_flight, fresh.concurrency)
        return node

    def send(self, binding: Binding, op: str, kwargs: dict[str, Any]) -> Sent:
        """Route, then dispatch (a hint call whose worker's direct queue turns out full goes to the shared queue)."""
        node = self.route(binding)
        try:
            return self.dispatch(binding, op, kwargs, node, binding.incarnation)
        except PoolSaturated:
            if node is None or binding.affinity is not Affinity.HINT:
                raise
            return self.dispatch(binding, op, kwargs, None, binding.incarnation)

    def dispatch(self, binding: Binding, op: str, kwargs: dict[str, Any], node: str | None,
                 incarnation: str | None) -> Sent:
        """Send to ``node``'s direct queue (None: the pool's shared queue), no routing decision.

        Big arguments go by reference (``routing.broker.claims``): stored first, named in the route. Backpressure:
        ``PoolSaturated`` before anything is written (``max_queued``); ``QueueTimeout`` (see ``deadlines``).
        """
        spec = self.pools.get(binding.pool)
        self.backlog.admit(binding.pool, node, spec.max_queued)
        queue = names.worker_queue(node) if node else names.pool_queue(binding.pool)
        moved = claims.offload(self.redis, binding.session_id, op, kwargs, self.claim_threshold_bytes, binding.ttl_s)
        queue_timeout_s = None if op in UNTIMED_OPS else spec.queue_timeout_s
        route = self._route_header(binding, node, incarnation, queue_timeout_s)
        args = [binding.session_id, op, moved.kwargs, {**route, "claims": moved.claims} if moved.claims else route]
        task_id = str(uuid.uuid4())
        trace = tracing.call_span(op, task_id, binding.session_id, binding.pool, binding.affinity.value, node)
        # A resend must send these arguments as they are now, not as the caller's objects may become.
        keep = self.keep_strict_args or not binding.affinity.strict  # s1: strict calls too with Sentinel
        waiting = Waiting(binding.session_id, binding.affinity.strict, node, incarnation,
                          binding.pool, copy.deepcopy(args) if keep else None, trace.headers)
        reply = self.results.expect(task_id, waiting, replied=True)
        trace.end_on(reply)
        message = None
        try:
            # Celery's message, pushed without send_task's overhead (routing/producer/publish.py); reply_to: the
            # worker publishes the result on the listener's one channel (no subscription per call).
            message = self.publisher.prepare(names.CALL_TASK, args, queue, task_id, shadow=task_view.task_name(
                op, kwargs), reply_to=self.results.reply_channel, argsrepr=redacted_argsrepr(args),
                headers=trace.headers)
            self.publisher.push(message)
        except EncodeError as exc:
            self.results.discard(task_id)
            claims.discard(self.redis, binding.session_id, moved.claims)
            raise InvalidArgument(op, f"arguments must be JSON-serializable ({exc})") from None
        except BaseException as exc:
            if message is None or not maybe_applied(message, exc):
                self.results.discard(task_id)  # surely not sent: the caller gets the error, nothing waits for it
                claims.discard(self.redis, binding.session_id, moved.claims)
                raise
            # Maybe applied (the reply is what was lost): pending still, looked for, resent only under its id.
            self.unconfirmed.look_for(copy.deepcopy(message), reply, waiting, binding.pool, binding.session_id,
                                      op, exc)
        if queue_timeout_s is not None:
            self.deadlines.track(task_id, reply, waiting, (queue, names.pool_queue(binding.pool)),
                                 queue_timeout_s, binding.session_id, op, moved.claims)
        sent = Sent(task_id, node, incarnation, reply)
        if self.worker_gone(binding, sent):  # died before the listener knew of this call
            self.results.fail_where(self._lost_on(node))
        return sent

    @staticmethod
    def _route_header(binding: Binding, node: str | None, incarnation: str | None,
                      queue_timeout_s: float | None = None) -> dict[str, Any]:
        """What the worker checks: a strict call runs only on the run of the node holding its state,
        and (``queue_timeout_s``) any call only if it starts by ``deadline`` (epoch seconds, this host's clock)."""
        return {"node": node, "pool": binding.pool, "affinity": binding.affinity.value, "ttl_s": binding.ttl_s,
                "incarnation": incarnation if node else None, "sent_at": round(time.time(), 3),
                **start_by(queue_timeout_s)}

    # -- waiting ---------------------------------------------------------------

    def worker_gone(self, binding: Binding, sent: Sent) -> bool:
        """The strict worker run ``sent`` waits on is gone (per the producer's watch; no round trip)."""
        return binding.affinity.strict and self._run_gone(sent.target, sent.incarnation)

    def _run_gone(self, node: str | None, incarnation: str | None) -> bool:
        if node is None:
            return False
        view = self.watch.get(node)
        return view is None or not view.live or not view.same_run(incarnation)

    def _lost_on(self, node: str | None) -> Any:
        """For the listener: the error of a pending strict call whose worker run ``node`` is gone."""
        def error_for(waiting: Waiting) -> BaseException | None:
            if waiting.strict and waiting.target == node and self._run_gone(node, waiting.incarnation):
                return SessionWorkerUnavailable(waiting.session_id, node)
            return None

        return error_for

    def on_worker_death(self, node: str) -> None:
        """The watch saw ``node`` die (or restart): its pending strict calls fail now, not after a timeout.

        What this producer kept about the node (its slots, its queue's estimate) is dropped.
        """
        self.direct_slots.forget_node(node)
        self.backlog.forget(names.worker_queue(node))
        self.results.fail_where(self._lost_on(node))

    def wait(self, binding: Binding, sent: Sent, op: str, timeout_s: float | None) -> dict[str, Any]:
        """The call's reply envelope ``{"node", "value"}``: a sleep until the result listener settles it.

        A strict call whose worker dies becomes ``SessionWorkerUnavailable`` as
        soon as the watch sees it, not after a timeout.
        """
        try:
            envelope: dict[str, Any] = sent.reply.result(timeout_s)
        except FutureTimeout:
            self.abandon([sent.task_id])
            raise CallTimeout(binding.session_id, op, timeout_s) from None
        return envelope

    def abandon(self, task_ids: list[str]) -> None:
        """Nobody waits for these calls any more (their caller timed out): forget them; a late result is dropped."""
        for task_id in task_ids:
            self.results.discard(task_id)
            self.deadlines.forget(task_id)
            self.unconfirmed.forget(task_id)

    # -- rehydration and close --------------------------------------------------

    def rehydrate(self, binding: Binding, dead: str | None, dead_incarnation: str | None) -> None:
        """Rebind away from a dead worker run and rebuild the session's refs there, in creation order.

        Ref ids stay the same, so the producer's handles keep working. Whatever
        lived only in the dead worker's memory (LM history) is gone. The binding
        points at the new worker only once every ref is rebuilt, so other threads
        never reach a half-built worker.
        """
        with binding.lock:
            if (binding.worker, binding.incarnation) != (dead, dead_incarnation):
                return  # another call of this session already did it
            replays = recipes.read(self.redis, binding.session_id)
            exclude = dead
            if dead is not None:
                view = self.registry.liveness([dead])[dead]
                if view.accepting and view.incarnation != dead_incarnation:
                    exclude = None  # the node is back as a new, empty run: it may host the session again
            node, incarnation = self.sessions.bind(binding.session_id, self.pools.get(binding.pool),
                                                   binding.affinity, binding.ttl_s, exclude=exclude)
            self.redis.hincrby(names.session_key(binding.session_id), "rehydrations", 1)
            self._watch_run(binding.pool, node, incarnation)
            for recipe in replays:
                sent = self.dispatch(binding, recipe.op, {**recipe.kwargs, "ref_id": recipe.ref_id}, node, incarnation)
                self.wait(binding, sent, recipe.op, rehydrate_call_timeout_s)
            self._adopt(binding, node, incarnation)
            binding.rehydrations += 1
            log.warning("session %s rehydrated on %s (was %s): %d ref(s) rebuilt",
                        binding.session_id, node, dead, len(replays))

    def background(self, fn: Callable[[], None], session_id: str) -> None:
        """Run ``fn`` off the result listener's thread (rehydration waits for replies the listener delivers);
        one session's work runs one at a time, in the order given (its reruns are sent in call order)."""
        self.lanes.run(session_id, fn)

    def revoke(self, task_id: str) -> None:
        """Tell the workers to skip a call that has not started (``CallFuture.cancel``)."""
        self.app.control.revoke(task_id)

    def shutdown(self) -> None:
        self.deadlines.close()
        self.unconfirmed.close()
        self.lanes.shutdown()

    def close(self, binding: Binding) -> None:
        """Delete the session record and tell its worker to free the session's objects."""
        node = self.sessions.close(binding.session_id)
        self.direct_slots.release(binding.session_id)
        if node:
            args = [binding.session_id, "release_session", {}, self._route_header(binding, node, binding.incarnation)]
            self.app.send_task(names.CALL_TASK, args=args, queue=names.worker_queue(node), ignore_result=True,
                               shadow=task_view.task_name("release_session", {}), argsrepr=redacted_argsrepr(args))
