"""The producer's entry point: a link per broker, and opening or attaching sessions."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from redis import Redis

from routing import tracing, validate
from routing.broker.brokers import broker_url, by_broker, server_of
from routing.broker.embedded import resolve_url
from routing.broker.failures import translated
from routing.broker.tls import tls_url
from routing.errors import NoCapableWorker, ServerUnavailable, SessionNotFound, SessionWorkerUnavailable
from routing.fleet import usage
from routing.fleet.registry import Registry
from routing.fleet.sessions import SessionRecord, SessionStore
from routing.pools import Affinity, Pool, PoolTable
from routing.producer import evaluation
from routing.producer.binding import Binding
from routing.producer.evaluation import EvaluationResult
from routing.producer.fleet_map import (
    FleetMap,
    Job,
    MapResult,
    ProgramSpec,
    Worker,
    check_map_arguments,
    check_run_arguments,
    program_spec,
    progress_bar,
)
from routing.producer.link import Link
from routing.producer.recovery.sweep import OrphanSweep
from routing.producer.results.listener import ResultListener
from routing.producer.router import Router
from routing.producer.session import Session
from routing.producer.watch import WorkerWatch
from routing.settings import Settings


class Client:
    """Opens sessions and sends their calls; one per producer process is enough.

    Holds a :class:`~routing.producer.link.Link` per broker: the default one
    (``redis_url``) from the start, and one for each other broker the pool table
    names (a pool's ``broker``), made the first time a session of such a pool is
    opened or attached. A session routes through its pool's link for good, so
    the call path is the same whatever the number of brokers.
    """

    def __init__(self, redis_url: str, settings: Settings | None = None, pools: PoolTable | None = None) -> None:
        self.settings = settings or Settings.from_env()
        tracing.setup("flagship-producer")  # the OTEL_* environment (routing.tracing): off unless it names an exporter
        self.pools = pools or PoolTable.load(self.settings.pools_config)
        self.redis_url = tls_url(redis_url)
        self._links_lock = threading.Lock()
        #: The default broker's link: made now, so a broker that cannot be used is ``ServerUnavailable`` here.
        self.default = Link(self.redis_url, self.settings, self.pools)
        self._links: dict[tuple[object, ...], Link] = {server_of(self.redis_url): self.default}

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        """``REDIS_URL``, else the embedded server's recorded address."""
        settings = settings or Settings.from_env()
        return cls(resolve_url(settings), settings)

    # The default broker's parts (what a single-broker client always had).
    @property
    def redis(self) -> Redis:
        return self.default.redis

    @property
    def app(self) -> Celery:
        return self.default.app

    @property
    def router(self) -> Router:
        return self.default.router

    @property
    def registry(self) -> Registry:
        return self.default.registry

    @property
    def sessions(self) -> SessionStore:
        return self.default.sessions

    @property
    def watch(self) -> WorkerWatch:
        return self.default.watch

    @property
    def results(self) -> ResultListener:
        return self.default.results

    @property
    def sweep(self) -> OrphanSweep:
        return self.default.sweep

    @property
    def links(self) -> list[Link]:
        """The links made so far, the default first."""
        with self._links_lock:
            return list(self._links.values())

    def link(self, pool: str) -> Link:
        """The link to ``pool``'s broker (made on first use)."""
        spec = validate.pool(pool, self.pools)
        return self.default if spec.broker is None else self._link_at(broker_url(spec, self.redis_url))

    def _link_at(self, url: str) -> Link:
        key = server_of(url)
        with self._links_lock:
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = Link(url, self.settings, self.pools)
            return link

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
        budget_tokens: int | None = None,
        budget_usd: float | None = None,
    ) -> Session:
        """Open a session on ``pool`` (on the pool's broker).

        ``bind="eager"`` binds now to the least-loaded live worker (``node`` asks
        for a specific one); ``"lazy"`` binds on the first call. ``rehydrate=True``
        rebuilds the session on a live worker when its strict worker is gone. Once the session's
        LM calls spent ``budget_tokens`` or ``budget_usd``, the next ones fail with ``BudgetExceeded``.
        """
        spec = validate.pool(pool, self.pools)  # every argument checked before anything is written
        sid = uuid.uuid4().hex if session_id is None else validate.session_id(session_id)
        mode = validate.affinity(affinity) or spec.affinity
        ttl = self.settings.session_ttl_s if ttl_s is None else validate.ttl(ttl_s)
        validate.choice(bind, "session", "bind", ("eager", "lazy"))
        node = None if node is None else validate.node(node)
        rehydrate = validate.flag(rehydrate, "session", "rehydrate")
        budget = usage.check_budget("session", budget_tokens, budget_usd)
        link = self.link(spec.name)
        with translated(link.url):
            usage.set_budget(link.redis, usage.session_key(sid), *budget)
            binding = Binding(sid, spec.name, mode, ttl)
            session = Session(link.router, binding, rehydrate, self.settings)
            if bind == "lazy":
                link.sessions.create(binding.session_id, spec, mode, binding.ttl_s)
            else:
                link.router.bind(binding, prefer=node)
                if node and binding.worker != node:
                    session.close()
                    raise SessionWorkerUnavailable(binding.session_id, node)
        return session

    def attach(self, session_id: str, *, rehydrate: bool = False, pool: str | None = None) -> Session:
        """A handle on an existing session (opened by this or another producer).

        The record is looked up on ``pool``'s broker when given, else on the
        default broker, then on each other broker of the pool table.
        """
        session_id = validate.session_id(session_id, "attach")
        rehydrate = validate.flag(rehydrate, "attach", "rehydrate")
        link, record = self._find(session_id, pool)
        with translated(link.url):
            binding = Binding(record.id, record.pool, record.affinity, record.ttl_s, record.worker, record.incarnation)
            link.router.follow(binding)
        return Session(link.router, binding, rehydrate, self.settings)

    def _find(self, session_id: str, pool: str | None) -> tuple[Link, SessionRecord]:
        """The link whose broker holds ``session_id``'s record, and the record."""
        if pool is not None:
            urls = [broker_url(validate.pool(pool, self.pools), self.redis_url)]
        else:
            urls = [url for url, _ in by_broker(self.pools, self.redis_url)]  # the default first
        unreachable: ServerUnavailable | None = None
        for url in urls:
            try:
                link = self._link_at(url)
                with translated(url):
                    return link, link.sessions.get(session_id)
            except SessionNotFound:
                continue
            except ServerUnavailable as exc:  # look on the other brokers; say so if it is nowhere else
                unreachable = unreachable or exc
        if unreachable is not None:
            raise unreachable
        raise SessionNotFound(session_id)

    def map(self, pool: str, signature: str | dict[str, Any] | None = None,
            examples: Sequence[dict[str, Any]] | None = None, *, module: str = "predict", program: str | None = None,
            state: Any = None, init: dict[str, Any] | None = None, lm: dict[str, Any] | None = None,
            instructions: str | None = None, chunk_size: int | None = None, progress: bool | None = None,
            timeout_s: float | None = None, budget_tokens: int | None = None,
            budget_usd: float | None = None) -> MapResult:
        """Run one DSPy program over ``examples`` on every live worker of ``pool``; outputs in input order.

        The program (``module`` "predict" or "chain_of_thought" over ``signature``,
        or ``program=`` a path as ``session.program`` takes it, with its ``state`` and
        ``init`` arguments; with an LM built from ``lm``'s ``session.lm`` arguments) is built once per
        worker. Chunks (default: the examples split evenly over the workers, at
        most 8 per worker thread) go to the workers as they free up, and a worker
        runs a chunk on all its threads; a chunk whose worker dies runs again
        elsewhere; a failed example holds its typed error. ``progress``: a progress bar on
        stderr (None: only on a terminal). ``budget_tokens``/``budget_usd``: the run's LM budget;
        ``MapResult.usage``: what its LM calls used.
        """
        spec = validate.pool(pool, self.pools)
        items, build = check_map_arguments(self.settings, signature, examples, module, lm, instructions, chunk_size,
                                           progress, timeout_s, program, state, init)
        budget = usage.check_budget("map", budget_tokens, budget_usd)
        with tracing.span("flagship.map call", {"flagship.pool": spec.name, "flagship.examples": len(items)}):
            return self._fleet(spec, build, items, Job(), chunk_size, progress, timeout_s, budget=budget)

    def evaluate(self, pool: str, program: str, devset: Sequence[Any], metric: str, *, state: Any = None,
                 init: dict[str, Any] | None = None, input_keys: Sequence[str] | None = None,
                 lm: dict[str, Any] | None = None, num_threads: int | None = None, progress: bool | None = None,
                 return_outputs: bool = True, chunk_size: int | None = None,
                 timeout_s: float | None = None, budget_tokens: int | None = None,
                 budget_usd: float | None = None) -> EvaluationResult:
        """``dspy.Evaluate(devset, metric)(program)`` over every live worker of ``pool``.

        ``program``: a path as ``session.program`` takes it (``state``, ``init``: its state and
        constructor arguments); ``devset``: ``dspy.Example``s with inputs marked, or dicts with
        ``input_keys``; ``metric``: a ``"package.module:function"`` path run on the worker as
        ``metric(example, prediction)``. ``num_threads``: examples at once per worker (default:
        its threads). The result has ``score`` (a percentage) and ``results``
        (example, prediction or typed error, score) in devset order.
        """
        spec = validate.pool(pool, self.pools)
        build = program_spec(self.settings, "evaluate", program, state, init, lm)
        check_run_arguments("evaluate", chunk_size, progress, timeout_s)
        if num_threads is not None:
            validate.number("evaluate", "num_threads", num_threads, 1, validate.max_threads, integer=True)
        work = evaluation.plan(devset, metric, input_keys, return_outputs)
        budget = usage.check_budget("evaluate", budget_tokens, budget_usd)
        with tracing.span("flagship.evaluate", {"flagship.pool": spec.name, "flagship.examples": len(work.items)}):
            run = self._fleet(spec, build, work.items, work.job, chunk_size, progress, timeout_s, num_threads, budget)
        return work.result(run)

    def _fleet(self, spec: Pool, build: ProgramSpec, examples: list[dict[str, Any]], job: Job,
               chunk_size: int | None, progress: bool | None, timeout_s: float | None,
               num_threads: int | None = None, budget: tuple[int | None, float | None] = (None, None)) -> MapResult:
        """One session per live worker of ``spec`` builds ``build``; ``examples`` run through ``job``."""
        link = self.link(spec.name)
        with translated(link.url):
            run = usage.start_run(link.redis, *budget)  # the run's sessions count (and are budgeted) together
            infos = [info for info in link.registry.workers([spec.name]) if info.live]
            workers: list[Worker] = []
            try:
                for info in infos:
                    try:
                        session = self.session(spec.name, node=info.node, affinity=Affinity.STRICT_QUEUE)
                    except (SessionWorkerUnavailable, NoCapableWorker):
                        continue  # gone or draining since we looked
                    usage.join_run(link.redis, session.id, run)
                    slots = min(info.concurrency, num_threads or info.concurrency, validate.max_threads)
                    workers.append(Worker(session, build, slots))
                if not workers:
                    raise NoCapableWorker(spec.name, list(spec.requires))
                advance, stop = progress_bar(len(examples), progress)
                try:
                    result = FleetMap(workers, examples, chunk_size, advance, job).run(timeout_s)
                    result.usage = usage.run_usage(link.redis, run)
                    return result
                finally:
                    stop()
            finally:
                for worker in workers:
                    worker.session.close()

    def usage(self, pool: str | None = None, model: str | None = None) -> dict[str, Any]:
        """LM usage of ``pool`` (None: every pool) and ``model`` (None: every model), on every broker."""
        urls = ([broker_url(validate.pool(pool, self.pools), self.redis_url)] if pool is not None
                else [url for url, _ in by_broker(self.pools, self.redis_url)])
        return usage.added(usage.pool_usage(self._link_at(url).redis, pool, model) for url in urls)

    def close(self) -> None:
        """Close every link (each broker's threads and connections)."""
        for link in self.links:
            link.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
