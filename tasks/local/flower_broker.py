"""Flower's Broker page (and its ``/api/queues/length``) on the project's transports: every pool's queues.

Flower builds its broker client from the URL of the Celery connection (``conn.as_uri()``), whose scheme
is the transport. With the project's kombu transports (``broker_transport``: ``routing.broker.transport``)
that is ``routing.broker.transport:RedisTransport://...``, a scheme Flower's ``Broker`` factory does not
know, so the page said "'redis' broker is not supported"; and it counted only the queues its inspector
had heard of (none before the first ``inspect`` reply).

:func:`install` replaces Flower's ``BaseHandler.get_broker`` with one returning :class:`FleetQueues`:
Flower's own Redis queue counter (``RedisBase.queues``) on a client made from the broker URL itself
(``redis://``, ``rediss://`` with its TLS options, every sentinel of a ``sentinel://`` URL), counting every
pool's shared queue and every registered worker's direct queue besides the queues Flower names. The page
shows the broker URL (password masked) instead of the transport's class path. ``deploy/run_flower.py``
runs :func:`main`: ``celery`` with this installed (Flower itself is not forked or copied).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from celery.bin.celery import main as celery_main
from flower import app as flower_app
from flower import views as flower_views
from flower.utils.broker import RedisBase
from redis import asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from routing import names
from routing.broker.brokers import broker_url, same_server
from routing.broker.connect import SentinelOptions, is_sentinel, parse_sentinel_url
from routing.pools import PoolTable
from routing.settings import Settings, redact_url

#: Flower's own timeouts for its broker queries (flower.utils.broker.RedisBase), so a dead broker cannot hang the page.
connect_timeout_s, read_timeout_s = RedisBase.DEFAULT_SOCKET_CONNECT_TIMEOUT, RedisBase.DEFAULT_SOCKET_TIMEOUT


def pool_queues(url: str, pools: PoolTable) -> set[str]:
    """The shared queues of the pools that live on the broker at ``url``."""
    return {names.pool_queue(pool.name) for pool in pools if same_server(broker_url(pool, url), url)}


class FleetQueues(RedisBase):  # type: ignore[misc]
    """Flower's Redis broker view for any project broker URL, counting every pool's queues."""

    def __init__(self, url: str, *, pools: PoolTable, sentinel: SentinelOptions, **kwargs: Any) -> None:
        super().__init__(url.split(";")[0], **kwargs)  # Flower parses one URL (host, port, credentials)
        self.fleet_queues = pool_queues(url, pools)
        self.sentinels: list[Any] = []
        timeouts = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": read_timeout_s}
        if not is_sentinel(url):
            self.redis = aioredis.Redis.from_url(url, **timeouts)
            return
        address = parse_sentinel_url(url)
        password = {"password": sentinel.password} if sentinel.password else {}
        manager = Sentinel(list(address.sentinels), sentinel_kwargs={**timeouts, **password}, **timeouts)
        self.sentinels = list(manager.sentinels)
        self.redis = manager.master_for(sentinel.master, db=address.db, username=address.username,
                                        password=address.password)

    async def queues(self, queue_names: Iterable[str]) -> list[dict[str, Any]]:
        try:
            direct = await self.redis.hkeys(names.DIRECT_QUEUES_KEY)
            queues = set(queue_names) | self.fleet_queues | {names.worker_queue(node.decode()) for node in direct}
            counted: list[dict[str, Any]] = await super().queues(sorted(queues))  # closes self.redis
            return counted
        finally:
            await self.redis.aclose()  # again, harmless: the lookup above may have failed before Flower's own close
            for client in self.sentinels:
                await client.aclose()


# replaces flower 2.2.0 views.BaseHandler.get_broker (its Broker factory knows no transport class path); pinned in
# tests/test_upstream_seams.py
def get_broker(handler: Any) -> FleetQueues:
    conf = handler.capp.conf
    return FleetQueues(conf.broker_url, pools=PoolTable.load(Settings.from_env().pools_config),
                       sentinel=SentinelOptions.from_env(), broker_options=conf.broker_transport_options or {})


def install() -> None:
    """Point Flower's broker views at :func:`get_broker`; show the broker's URL, not the transport class path."""
    flower_views.BaseHandler.get_broker = get_broker
    # replaces flower 2.2.0 app.Flower.broker_uri (a cached property: the connection's URI, transport path included)
    flower_app.Flower.broker_uri = property(lambda app: redact_url(app.capp.conf.broker_url))


def main() -> int:
    """``celery <args>``, :func:`install` done first: ``python -m tasks.local.flower_broker -A tasks.app flower``."""
    install()
    sys.argv[0] = "celery"
    status: int = celery_main()
    return status


if __name__ == "__main__":
    sys.exit(main())
