"""The producer-side client: open sessions on pools and route their calls."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from kombu.exceptions import EncodeError
from redis import Redis

from routing import names
from routing.celery_config import celery_config
from routing.embedded import resolve_url
from routing.errors import InvalidArgument, SessionWorkerUnavailable, WorkerBusy
from routing.pools import Affinity, PoolTable
from routing.producer.future import CallFuture
from routing.producer.session import Session
from routing.producer.watch import WorkerWatch
from routing.reaper import reap_dead_workers
from routing.registry import Liveness, Registry
from routing.sessions import SessionStore
from routing.settings import Settings

log = logging.getLogger(__name__)

#: Each recipe replayed during a rehydration must finish within this long.
rehydrate_call_timeout_s = 120.0


#: Argument names whose values never appear in task events, Flower or worker logs.
SECRET_ARGUMENTS = frozenset({"api_key"})


def _redacted_repr(args: list[Any]) -> str | None:
    """The repr Celery shows for a call (None: Celery's own), with secret arguments masked."""
    kwargs = args[2]
    if not SECRET_ARGUMENTS & kwargs.keys():
        return None
    return repr([args[0], args[1], {k: "***" if k in SECRET_ARGUMENTS else v for k, v in kwargs.items()}, args[3]])


class Client:
    """Opens sessions and sends their calls; one per producer process is enough.

    The routing decision reads a cached view of the bound workers (see
    :class:`~routing.producer.watch.WorkerWatch`), so a strict call costs the same Redis
    work as a plain Celery ``send_task``. ``strict_fail_fast`` is the exception:
    it reads the worker's in-flight count fresh, one round trip, by definition.
    """

    def __init__(self, redis_url: str, settings: Settings | None = None, pools: PoolTable | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.pools = pools or PoolTable.load(self.settings.pools_config)
        self.redis_url = redis_url
        self.redis = Redis.from_url(redis_url, decode_responses=True)
        self.sessions = SessionStore(self.redis)
        self.registry = Registry(self.redis, self.settings)
        self.watch = WorkerWatch(self.registry, self.settings.watch_interval_s, self._on_worker_death)
        self.app = Celery("flagship-client", set_as_current=False)
        self.app.conf.update(celery_config(self.settings, redis_url))

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        """``REDIS_URL``, else the embedded server's recorded address."""
        settings = settings or Settings.from_env()
        return cls(resolve_url(settings), settings)

    # -- sessions ------------------------------------------------------------

    def session(
        self,
        pool: str,
        session_id: str | None = None,
        *,
        affinity: Affinity | str | None = None,
        ttl_s: float | None = None,
        bind: str = "eager",
        node: str | None = None,
        rehydrate: bool = False,
    ) -> Session:
        """Open a session on ``pool``.

        ``bind="eager"`` binds now to the least-loaded live worker (``node`` asks
        for a specific one); ``"lazy"`` binds on the first call. ``rehydrate=True``
        rebuilds the session on a live worker when its strict worker is gone.
        """
        spec = self.pools.get(pool)
        mode = Affinity(affinity) if affinity else spec.affinity
        session_id = session_id or uuid.uuid4().hex
        ttl = ttl_s or self.settings.session_ttl_s
        session = Session(self, session_id, spec.name, mode, None, ttl, rehydrate)
        if bind == "lazy":
            self.sessions.create(session_id, spec, mode, ttl)
        else:
            self._bind(session, prefer=node)
            if node and session.worker != node:
                session.close()
                raise SessionWorkerUnavailable(session_id, node)
        return session

    def attach(self, session_id: str, *, rehydrate: bool = False) -> Session:
        """A handle on an existing session (opened by this or another producer)."""
        record = self.sessions.get(session_id)
        session = Session(self, record.id, record.pool, record.affinity, record.worker, record.ttl_s, rehydrate)
        session.incarnation = record.incarnation
        if record.worker:
            self.watch.watch(record.worker)
            self.watch.refresh()
        return session

    def _bind(self, session: Session, prefer: str | None = None, exclude: str | None = None) -> None:
        spec = self.pools.get(session.pool)
        node, incarnation = self.sessions.bind(session.id, spec, session.affinity, session.ttl_s,
                                               prefer=prefer, exclude=exclude)
        self._adopt(session, node, incarnation)

    def _adopt(self, session: Session, node: str, incarnation: str) -> None:
        """Point the handle at its (new) worker run and start watching it."""
        session.worker, session.incarnation = node, incarnation
        self.watch.watch(node, Liveness(live=True, in_flight=0, concurrency=self.pools.get(session.pool).concurrency,
                                        incarnation=incarnation))

    def _close(self, session: Session) -> None:
        node = self.sessions.close(session.id)
        if node:
            route = self._route_header(session, node, session.incarnation)
            self.app.send_task(names.CALL_TASK, args=[session.id, "release_session", {}, route],
                               queue=names.worker_queue(node), ignore_result=True)

    # -- calls ---------------------------------------------------------------

    def _route(self, session: Session) -> str | None:
        """The node to send to (its direct queue), or None for the pool's shared queue."""
        if session.worker is None:
            with session.lock:
                if session.worker is None:
                    self._bind(session)
        node = session.worker
        assert node is not None
        view = self.watch.get(node)
        if session.affinity is Affinity.HINT:
            return node if view is not None and view.accepting and not view.saturated else None
        if view is None or not session.holds_state_on(view):
            raise SessionWorkerUnavailable(session.id, node)
        if session.affinity is Affinity.STRICT_FAIL_FAST:
            fresh = self.registry.liveness([node])[node]
            if not session.holds_state_on(fresh):
                raise SessionWorkerUnavailable(session.id, node)
            if fresh.saturated:
                raise WorkerBusy(session.id, node, fresh.in_flight, fresh.concurrency)
        return node

    def _route_header(self, session: Session, node: str | None, incarnation: str | None) -> dict[str, Any]:
        """What the worker checks: a strict call runs only on the run of the node holding its state."""
        return {"node": node, "pool": session.pool, "affinity": session.affinity.value, "ttl_s": session.ttl_s,
                "incarnation": incarnation if node else None}

    def _rehydrate(self, session: Session, dead: str | None, dead_incarnation: str | None) -> None:
        """Rebind ``session`` away from its dead worker run and rebuild its refs there, in creation order.

        Ref ids stay the same, so the producer's handles keep working. Whatever
        lived only in the dead worker's memory (LM history) is gone. The session
        points at the new worker only once every ref is rebuilt, so other threads
        never reach a half-built worker.
        """
        with session.lock:
            if (session.worker, session.incarnation) != (dead, dead_incarnation):
                return  # another call of this session already did it
            recipes = self.sessions.recipes(session.id)
            exclude = dead
            if dead is not None:
                view = self.registry.liveness([dead])[dead]
                if view.accepting and view.incarnation != dead_incarnation:
                    exclude = None  # the node is back as a new, empty run: it may host the session again
            spec = self.pools.get(session.pool)
            node, incarnation = self.sessions.bind(session.id, spec, session.affinity, session.ttl_s, exclude=exclude)
            self.redis.hincrby(names.session_key(session.id), "rehydrations", 1)
            for ref_id, op, kwargs in recipes:
                replay = self._dispatch(session, op, {**kwargs, "ref_id": ref_id}, node, incarnation, False)
                replay.result(rehydrate_call_timeout_s)
            self._adopt(session, node, incarnation)
            session.rehydrations += 1
            log.warning("session %s rehydrated on %s (was %s): %d ref(s) rebuilt",
                        session.id, node, dead, len(recipes))

    def _send(self, session: Session, op: str, kwargs: dict[str, Any], rehydrate: bool = False) -> CallFuture:
        node = self._route(session)
        return self._dispatch(session, op, kwargs, node, session.incarnation, rehydrate)

    def _dispatch(self, session: Session, op: str, kwargs: dict[str, Any], node: str | None,
                  incarnation: str | None, rehydrate: bool) -> CallFuture:
        """Send to ``node``'s direct queue (None: the pool's shared queue), no routing decision."""
        queue = names.worker_queue(node) if node else names.pool_queue(session.pool)
        args = [session.id, op, kwargs, self._route_header(session, node, incarnation)]
        try:
            result = self.app.send_task(names.CALL_TASK, args=args, queue=queue, argsrepr=_redacted_repr(args))
        except EncodeError as exc:
            raise InvalidArgument(op, f"arguments must be JSON-serializable ({exc})") from None
        return CallFuture(session, op, result, node, incarnation, kwargs, rehydrate)

    def _on_worker_death(self, node: str) -> None:
        try:
            reap_dead_workers(self.redis)
        except Exception:  # the watch thread must survive; the next refresh retries
            log.exception("reaping after the death of %s failed", node)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        self.watch.close()
        self.app.close()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
