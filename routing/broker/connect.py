"""Every Redis client the project makes: a plain URL, or Redis Sentinel naming the current primary.

``redis://`` / ``rediss://`` / ``unix://`` URLs go to redis-py as they are. A
Sentinel URL lists the sentinels the way kombu and Celery write it::

    sentinel://[:password@]host1:26379;sentinel://host2:26379/0

The password in the URL is the primary's (as kombu reads it); the sentinels'
own password and the primary's name come from :class:`SentinelOptions`
(``FLAGSHIP_SENTINEL_MASTER``, ``FLAGSHIP_SENTINEL_PASSWORD``). The client
asks the sentinels for the primary on every new connection, so after a
failover it follows the new primary without a restart (commands in flight when
the old one died fail once with a connection error).

Every client gets the connection settings below, set explicitly (a caller's own
arguments, and options in the URL, win): redis-py's defaults differ between the
versions this project allows (none of these timeouts before 8.0), and without
them a host or network failure that sends no TCP reset leaves a command, or an
idle pub/sub socket, waiting until TCP gives up (~15 minutes).

This module imports only the standard library and redis-py: the liveness pulse
(``routing/fleet/pulse.py``), which runs without the ``routing`` package, loads it from
its file.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.client import PubSub
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

log = logging.getLogger(__name__)

#: The primary's name when ``FLAGSHIP_SENTINEL_MASTER`` is unset (Redis' and Celery's examples use it too).
DEFAULT_MASTER = "mymaster"
#: Socket timeouts for questions to a sentinel (unless the caller passes its own ``socket_*`` options).
sentinel_timeout_s = 2.0

#: A command whose reply has not come this long after it was sent fails with ``TimeoutError`` (the longest
#: command the project sends, a big ``MGET`` or ``LRANGE``, takes milliseconds; ``WAIT`` at most 0.5 s).
socket_timeout_s = 5.0
#: Connecting (TCP, then TLS) gives up after this long.
socket_connect_timeout_s = 5.0
#: A pooled connection idle this long is PINGed before its next command, so a dead one is replaced
#: rather than failing that command.
health_check_interval_s = 10
#: TCP keepalive: the first probe after this many seconds of silence, then one every ``keepalive_interval_s``;
#: ``keepalive_probes`` unanswered ones close the socket (~25 s): an idle connection to a host that vanished
#: errors instead of lingering.
keepalive_idle_s, keepalive_interval_s, keepalive_probes = 10, 5, 3
#: A command that fails with a connection error or a timeout is tried once more on a fresh connection (redis-py 8
#: tries 11 times: ~55 s against a silent server); so a command gives up within ~11 s. The producer's push of a
#: call is never retried (``routing.producer.publish``): a lost reply does not say whether it was applied.
command_retries = 1


def keepalive_options() -> dict[int, int]:
    """The ``TCP_KEEP*`` socket options this platform has, with the values above."""
    names = (("TCP_KEEPIDLE", keepalive_idle_s), ("TCP_KEEPINTVL", keepalive_interval_s),
             ("TCP_KEEPCNT", keepalive_probes))
    return {getattr(socket, name): value for name, value in names if hasattr(socket, name)}


def connection_options(retries: int = command_retries, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` over the settings above: timeouts, keepalive, health checks, ``retries`` retries."""
    return {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_connect_timeout_s,
            "socket_keepalive": True, "socket_keepalive_options": keepalive_options(),
            "health_check_interval": health_check_interval_s,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries), **kwargs}


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


@dataclass(frozen=True)
class SentinelOptions:
    master: str = DEFAULT_MASTER
    #: Password of the sentinels themselves (``requirepass`` in sentinel.conf); the primary's is in the URL.
    password: str | None = None
    #: How long a write that must survive a failover waits for a replica's acknowledgement
    #: (``FLAGSHIP_SENTINEL_WAIT_MS``; see :func:`execute_replicated`).
    replica_wait_ms: int = 500

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SentinelOptions:
        env = os.environ if env is None else env
        wait_ms = (env.get("FLAGSHIP_SENTINEL_WAIT_MS") or "").strip()
        return cls(env.get("FLAGSHIP_SENTINEL_MASTER") or DEFAULT_MASTER, env.get("FLAGSHIP_SENTINEL_PASSWORD") or None,
                   max(0, int(wait_ms)) if wait_ms.isdigit() else cls.replica_wait_ms)

    def transport_options(self) -> dict[str, Any]:
        """kombu's and Celery's Sentinel transport options for these settings."""
        options: dict[str, Any] = {"master_name": self.master}
        if self.password:
            options["sentinel_kwargs"] = {"password": self.password}
        return options


@dataclass(frozen=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The sentinels, database and primary credentials of a ``sentinel://...;sentinel://...`` URL."""
    hosts: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parts = urlsplit(part)
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel URL: {part!r} (expected sentinel://host:port[/db])")
        hosts.append((parts.hostname, parts.port or 26379))
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        username = unquote(parts.username) if parts.username else username
        password = unquote(parts.password) if parts.password else password
    if not hosts:
        raise ValueError("a sentinel URL names at least one sentinel")
    return SentinelAddress(tuple(hosts), db, username, password)


def sentinel_for(url: str, options: SentinelOptions | None = None, **kwargs: Any) -> Sentinel:
    address = parse_sentinel_url(url)
    options = options or SentinelOptions.from_env()
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    # A sentinel that stopped answering must not hang the question "which server is the primary?".
    sentinel_kwargs.setdefault("socket_timeout", sentinel_timeout_s)
    sentinel_kwargs.setdefault("socket_connect_timeout", sentinel_timeout_s)
    if options.password:
        sentinel_kwargs["password"] = options.password
    return Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs)


def redis_client(url: str, *, decode_responses: bool = False, sentinel: SentinelOptions | None = None,
                 retries: int = command_retries, **kwargs: Any) -> Redis:
    """A client for ``url``; for a Sentinel URL, one that always talks to the current primary.

    Its connections get :func:`connection_options` (``kwargs`` win); ``retries``: how many times a command
    that lost its connection is tried again.
    """
    if not is_sentinel(url):
        settings = connection_options(retries, **kwargs)
        if urlsplit(url).scheme == "unix":  # no TCP: redis-py's socket-file connections take no keepalive options
            settings = {k: v for k, v in settings.items() if not k.startswith("socket_keepalive")}
        return Redis.from_url(url, decode_responses=decode_responses, **settings)
    address = parse_sentinel_url(url)
    options = sentinel or SentinelOptions.from_env()
    client: Redis = sentinel_for(url, options, **kwargs).master_for(
        options.master, redis_class=Redis, db=address.db, username=address.username, password=address.password,
        decode_responses=decode_responses, **connection_options(retries, **kwargs))
    return client


def primary_address(url: str, sentinel: SentinelOptions | None = None) -> str | None:
    """``host:port`` of the current primary (Sentinel URLs), or None for a plain URL."""
    if not is_sentinel(url):
        return None
    options = sentinel or SentinelOptions.from_env()
    manager = sentinel_for(url, options)
    try:
        host, port = manager.discover_master(options.master)
    finally:
        for client in manager.sentinels:
            client.close()
    return f"{host}:{port}"


def server_address(url: str, sentinel: SentinelOptions | None = None) -> str:
    """The server ``url`` talks to right now: the current primary for Sentinel, else the URL's host:port (or socket)."""
    primary = primary_address(url, sentinel)
    if primary is not None:
        return primary
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def follows_sentinel(redis: Redis) -> bool:
    """Whether ``redis`` was made for a Sentinel URL (its connections go to whichever server is primary)."""
    return isinstance(redis.connection_pool, SentinelConnectionPool)


#: Connection pool id -> until when writes skip ``WAIT`` (no replica acknowledged the last one).
_no_replica_until: dict[int, float] = {}
#: After a ``WAIT`` no replica answered, writes skip it this long (a primary without replicas is not slowed).
replica_retry_s = 10.0


def execute_replicated(redis: Redis, pipe: Any, options: SentinelOptions | None = None) -> list[Any]:
    """Execute ``pipe`` (made with ``transaction=False``) and, with Sentinel, ``WAIT 1 <ms>`` for a replica.

    Replication is asynchronous: a primary killed right after a write takes the
    write with it unless a replica has it. Session records and recipes are
    written seldom (open, bind, rebind, a new ref), so waiting for one replica's
    acknowledgement costs little and makes the promoted replica hold them.
    ``WAIT`` covers the writes of its own connection, so it rides in the same
    pipeline (not in ``MULTI``, where it would not wait). Returns the pipeline's
    replies without the ``WAIT`` reply; when no replica answered in time the
    write stands on the primary alone and a warning says so.
    """
    wait_ms = (options or SentinelOptions.from_env()).replica_wait_ms if follows_sentinel(redis) else 0
    pool = id(redis.connection_pool)
    if wait_ms > 0 and _no_replica_until.get(pool, 0.0) > time.monotonic():
        wait_ms = 0  # no replica answered lately (the primary runs alone): do not make every write wait
    if wait_ms > 0:
        pipe.execute_command("WAIT", 1, wait_ms)
    replies: list[Any] = pipe.execute()
    if wait_ms > 0 and not replies.pop():
        _no_replica_until[pool] = time.monotonic() + replica_retry_s
        log.warning("no replica acknowledged a session write within %d ms; it is on the primary only "
                    "(writes do not wait for %.0f s)", wait_ms, replica_retry_s)
    return replies


class PubSubFailingOnLoss(PubSub):  # type: ignore[misc]
    """A pub/sub whose commands and reads raise on a lost connection instead of reconnecting inside them.

    redis-py reconnects (and resubscribes) in the read that found the connection broken, then blocks
    reading the new one: kombu, which read because the old socket was readable, stayed in that read for
    good, and the worker took no more calls after a connection blip. Raising lets kombu's consumer
    restart its connection as it does for any other loss.
    """

    # replaces redis-py PubSub._execute (retries with a reconnect); pinned in tests/test_upstream_seams.py
    def _execute(self, conn: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        return command(*args, **kwargs)
