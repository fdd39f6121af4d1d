"""Which broker each pool lives on: the default one, or the pool table's ``broker`` URL.

A pool without ``broker`` lives on the default broker (``REDIS_URL``, else the
embedded server); one with it lives only on that server: its queues, workers,
sessions, heartbeats and call results. Producers keep one connection set per
broker (``routing.producer.link``); status and metrics read every broker.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from routing.broker.tls import tls_url
from routing.pools import Pool, PoolTable

#: Ports a URL without one means (a Redis server; a sentinel).
DEFAULT_PORTS = {"sentinel": 26379}


def broker_url(pool: Pool, default_url: str) -> str:
    """The URL ``pool``'s workers and sessions use (``rediss://`` with its TLS options filled in)."""
    return tls_url(pool.broker) if pool.broker else default_url


def server_of(url: str) -> tuple[object, ...]:
    """What names a server in ``url``: scheme, hosts and ports, database, user (not the password or options).

    Two spellings of one server (``redis://h:6379`` and ``redis://h:6379/0``) are one broker.
    """
    servers: list[tuple[object, ...]] = []
    db, user = "0", ""
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parts = urlsplit(part)
        if parts.scheme == "unix":
            servers.append(("unix", parts.path))
            continue
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 6379)
        servers.append((parts.scheme, (parts.hostname or "").lower(), port))
        db = parts.path.strip("/") or db
        user = unquote(parts.username) if parts.username else user
    return (tuple(sorted(servers)), db, user)


def same_server(a: str, b: str) -> bool:
    return server_of(a) == server_of(b)


def by_broker(pools: PoolTable, default_url: str) -> list[tuple[str, PoolTable]]:
    """Each broker's URL and the pools on it; the default broker first, always (it may hold no pool)."""
    groups: dict[tuple[object, ...], tuple[str, dict[str, Pool]]] = {server_of(default_url): (default_url, {})}
    for pool in pools:
        url = broker_url(pool, default_url)
        groups.setdefault(server_of(url), (url, {}))[1][pool.name] = pool
    return [(url, PoolTable(members)) for url, members in groups.values()]
