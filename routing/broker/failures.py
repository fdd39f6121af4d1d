"""Broker failures as the project's typed error: ``ServerUnavailable``, with the URL's password masked.

redis-py and kombu raise their own exceptions (``AuthenticationError``,
``ConnectionError``, kombu's ``OperationalError``, ...). A producer gets
:class:`~routing.errors.ServerUnavailable` instead, naming the cause in a few
words; a worker or the CLI prints the same line and exits at start-up
(:func:`check_broker`), before Celery would retry the broker a hundred times.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis as redis_lib
from kombu.exceptions import OperationalError

from routing.broker.connect import redis_client
from routing.errors import ServerUnavailable
from routing.settings import redact_url

F = TypeVar("F", bound=Callable[..., Any])

#: Exceptions that mean "the broker cannot be used", from redis-py, kombu and the socket layer.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.exceptions.NoPermissionError,
    OperationalError, ConnectionError, ssl.SSLError,
)
#: How long a start-up check waits for the broker to connect and answer.
check_timeout_s = 5.0


def cause(exc: BaseException) -> str:
    """A few words naming what went wrong, then the library's own message (one line)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{message} {exc.__cause__ or ''} {exc.__context__ or ''}".lower()
    if isinstance(exc, redis_lib.AuthenticationError) or "wrongpass" in text or "noauth" in text:
        kind = "authentication failed"
    elif isinstance(exc, redis_lib.exceptions.NoPermissionError):
        kind = "the user lacks a permission (ACL)"
    elif isinstance(exc, ssl.SSLError) or "ssl" in text or "tls" in text or "certificate" in text:
        kind = "TLS failed"
    elif isinstance(exc, (redis_lib.TimeoutError, TimeoutError)) or "timed out" in text or "timeout" in text:
        kind = "timed out"
    elif "refused" in text:
        kind = "connection refused"
    elif "closed by server" in text or "reset" in text:
        kind = "the server closed the connection (TLS expected? use rediss://)"
    else:
        kind = "cannot connect"
    return f"{kind}: {message}"


def unavailable(url: str, exc: BaseException) -> ServerUnavailable:
    return ServerUnavailable(redact_url(url), cause(exc))


@contextmanager
def translated(url: str) -> Iterator[None]:
    """Re-raise broker failures inside the block as ``ServerUnavailable`` (URL masked)."""
    try:
        yield
    except BROKER_ERRORS as exc:
        raise unavailable(url, exc) from exc


def translating(url_of: Callable[[Any], str]) -> Callable[[F], F]:
    """Decorate a method so broker failures leave it as ``ServerUnavailable``; ``url_of(self)`` names the broker."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except BROKER_ERRORS as exc:
                raise unavailable(url_of(self), exc) from exc

        return wrapper  # type: ignore[return-value]

    return decorate


def check_broker(url: str, timeout_s: float = check_timeout_s) -> None:
    """Connect, authenticate and ``PING`` once; ``ServerUnavailable`` naming the cause if that fails."""
    try:
        client = redis_client(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError as exc:  # a malformed URL or query option
        raise ServerUnavailable(redact_url(url), f"invalid URL: {exc}") from exc
    try:
        with translated(url):
            client.ping()
    finally:
        client.close()
