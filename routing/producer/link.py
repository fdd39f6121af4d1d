"""A producer's connections to one broker: everything a session on a pool of that broker routes through.

A :class:`~routing.producer.client.Client` holds one link for the default broker
and one more, made on first use, per other broker the pool table names (a pool's
``broker``). Each link has its own Celery app, Redis client, registry, session
store, worker watch, result listener, router and orphan sweep, so a session's
calls, its liveness watch and its results never touch another broker.
"""

from __future__ import annotations

from celery import Celery

from routing.broker.celery_config import celery_config
from routing.broker.connect import redis_client
from routing.broker.envelope import configure_unacked_keys
from routing.broker.failures import check_broker
from routing.fleet.registry import Registry
from routing.fleet.sessions import SessionStore
from routing.pools import PoolTable
from routing.producer.recovery.sweep import OrphanSweep
from routing.producer.results.listener import ResultListener
from routing.producer.results.listener_backend import listener_backend_url
from routing.producer.router import Router
from routing.producer.watch import WorkerWatch, reap_on_death
from routing.settings import Settings


class Link:
    """The connections, worker view, result listener, router and sweep for the broker at ``url``."""

    def __init__(self, url: str, settings: Settings, pools: PoolTable) -> None:
        check_broker(url)  # a wrong password, an unreachable server, a TLS mismatch: ServerUnavailable now
        self.url = url
        self.redis = redis_client(url, decode_responses=True)
        self.sessions = SessionStore(self.redis)
        self.registry = Registry(self.redis, settings)
        self.watch = WorkerWatch(self.registry, settings.watch_interval_s, self._on_worker_death)
        self.app = Celery("flagship-client", set_as_current=False)
        self.app.conf.update(celery_config(settings, url))
        configure_unacked_keys(self.app.conf.broker_transport_options)  # the sweep and the reaper read kombu's keys
        # Results come through the listener's subscriptions, not Celery's own result consumer.
        self.app.conf.result_backend = listener_backend_url(url)
        self.app.conf.result_backend_thread_safe = True  # one backend for every producer thread
        self.results = ResultListener(self.app, url)
        self.router = Router(self.app, self.redis, self.sessions, self.registry, self.watch, pools,
                             self.results, claim_threshold_bytes=settings.claim_threshold_bytes)
        self._reap = reap_on_death(self.redis)
        # Hint calls a dead worker took with it come back (see routing/producer/recovery/sweep.py).
        self.sweep = OrphanSweep(self.app, self.redis, self.results, settings.heartbeat_interval_s)
        self.watch.follow_pools(self.sweep.pools_pending)

    def _on_worker_death(self, node: str) -> None:
        """Called by the watch: fail the dead run's pending strict calls, move what it held, find lost hint calls."""
        self.router.on_worker_death(node)
        self._reap(node)
        self.sweep.on_death(node)

    def close(self) -> None:
        self.watch.close()
        self.sweep.close()
        self.router.shutdown()
        self.results.close()
        self.app.close()
        self.redis.close()
