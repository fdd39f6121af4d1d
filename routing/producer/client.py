"""The producer's entry point: connections, and opening or attaching sessions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from celery import Celery
from redis import Redis

from routing import validate
from routing.broker_errors import check_broker, translating
from routing.celery_config import celery_config
from routing.embedded import resolve_url
from routing.errors import NoCapableWorker, SessionWorkerUnavailable
from routing.pools import Affinity, PoolTable
from routing.producer.binding import Binding
from routing.producer.fleet import FleetMap, MapResult, Worker, check_map_arguments, progress_bar
from routing.producer.results import ResultListener, listener_backend_url
from routing.producer.router import Router
from routing.producer.session import Session
from routing.producer.sweep import OrphanSweep
from routing.producer.watch import WorkerWatch, reap_on_death
from routing.registry import Registry
from routing.sessions import SessionStore
from routing.settings import Settings
from routing.tls import tls_url


class Client:
    """Opens sessions and sends their calls; one per producer process is enough.

    Holds the connections (Redis, the Celery app), the producer's cached view of
    the workers it routes to, and the :class:`~routing.producer.router.Router`
    every session of this client uses.
    """

    def __init__(self, redis_url: str, settings: Settings | None = None, pools: PoolTable | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.pools = pools or PoolTable.load(self.settings.pools_config)
        redis_url = tls_url(redis_url)
        check_broker(redis_url)  # a wrong password, an unreachable server, a TLS mismatch: ServerUnavailable now
        self.redis_url = redis_url
        self.redis = Redis.from_url(redis_url, decode_responses=True)
        self.sessions = SessionStore(self.redis)
        self.registry = Registry(self.redis, self.settings)
        self.watch = WorkerWatch(self.registry, self.settings.watch_interval_s, self._on_worker_death)
        self.app = Celery("flagship-client", set_as_current=False)
        self.app.conf.update(celery_config(self.settings, redis_url))
        # Results come through the listener's subscriptions, not Celery's own result consumer.
        self.app.conf.result_backend = listener_backend_url(redis_url)
        self.app.conf.result_backend_thread_safe = True  # one backend for every producer thread
        self.results = ResultListener(self.app, redis_url)
        self.router = Router(self.app, self.redis, self.sessions, self.registry, self.watch, self.pools,
                             self.results, claim_threshold_bytes=self.settings.claim_threshold_bytes)
        self._reap = reap_on_death(self.redis)
        # Hint calls a dead worker took with it come back (see routing/producer/sweep.py).
        self.sweep = OrphanSweep(self.app, self.redis, self.results, self.settings.heartbeat_interval_s)
        self.watch.follow_pools(self.sweep.pools_pending)

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        """``REDIS_URL``, else the embedded server's recorded address."""
        settings = settings or Settings.from_env()
        return cls(resolve_url(settings), settings)

    @translating(attrgetter("redis_url"))
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
        spec = validate.pool(pool, self.pools)  # every argument checked before anything is written
        sid = uuid.uuid4().hex if session_id is None else validate.session_id(session_id)
        mode = validate.affinity(affinity) or spec.affinity
        ttl = self.settings.session_ttl_s if ttl_s is None else validate.ttl(ttl_s)
        validate.choice(bind, "session", "bind", ("eager", "lazy"))
        node = None if node is None else validate.node(node)
        binding = Binding(sid, spec.name, mode, ttl)
        session = Session(self.router, binding, validate.flag(rehydrate, "session", "rehydrate"), self.settings)
        if bind == "lazy":
            self.sessions.create(binding.session_id, spec, mode, binding.ttl_s)
        else:
            self.router.bind(binding, prefer=node)
            if node and binding.worker != node:
                session.close()
                raise SessionWorkerUnavailable(binding.session_id, node)
        return session

    @translating(attrgetter("redis_url"))
    def attach(self, session_id: str, *, rehydrate: bool = False) -> Session:
        """A handle on an existing session (opened by this or another producer)."""
        record = self.sessions.get(validate.session_id(session_id, "attach"))
        binding = Binding(record.id, record.pool, record.affinity, record.ttl_s, record.worker, record.incarnation)
        rehydrate = validate.flag(rehydrate, "attach", "rehydrate")
        self.router.follow(binding)
        return Session(self.router, binding, rehydrate, self.settings)

    def _on_worker_death(self, node: str) -> None:
        """Called by the watch: fail the dead run's pending strict calls, move what it held, find lost hint calls."""
        self.router.on_worker_death(node)
        self._reap(node)
        self.sweep.on_death(node)

    @translating(attrgetter("redis_url"))
    def map(self, pool: str, signature: str | dict[str, Any], examples: Sequence[dict[str, Any]], *,
            module: str = "predict", lm: dict[str, Any] | None = None, instructions: str | None = None,
            chunk_size: int | None = None, progress: bool | None = None,
            timeout_s: float | None = None) -> MapResult:
        """Run one DSPy program over ``examples`` on every live worker of ``pool``; outputs in input order.

        The program (``module`` "predict" or "chain_of_thought" over ``signature``,
        with an LM built from ``lm``'s ``session.lm`` arguments) is built once per
        worker. Chunks (default: one worker's threads' worth) spread over the
        workers as they free up; a chunk whose worker dies runs again elsewhere;
        a failed example holds its typed error. ``progress``: a progress bar on
        stderr (None: only on a terminal).
        """
        spec = validate.pool(pool, self.pools)
        examples = check_map_arguments(self.settings, signature, examples, module, lm, instructions, chunk_size,
                                       progress, timeout_s)
        infos = [info for info in self.registry.workers([spec.name]) if info.live]
        workers: list[Worker] = []
        try:
            for info in infos:
                try:
                    session = self.session(spec.name, node=info.node, affinity=Affinity.STRICT_QUEUE)
                except (SessionWorkerUnavailable, NoCapableWorker):
                    continue  # gone or draining since we looked
                workers.append(Worker(session, session.lm(**lm) if lm else None, module, signature,
                                      instructions, info.concurrency))
            if not workers:
                raise NoCapableWorker(spec.name, list(spec.requires))
            advance, stop = progress_bar(len(examples), progress)
            try:
                return FleetMap(workers, examples, chunk_size, advance).run(timeout_s)
            finally:
                stop()
        finally:
            for worker in workers:
                worker.session.close()

    def close(self) -> None:
        self.watch.close()
        self.sweep.close()
        self.router.shutdown()
        self.results.close()
        self.app.close()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
