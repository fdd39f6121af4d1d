"""Typed errors: each survives the trip through Celery's result backend; bad input loses nothing."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable

import pytest

import routing.errors as errors
from routing import Client, Session
from routing.errors import (
    FlagshipError,
    InvalidArgument,
    SessionClosed,
    SessionNotFound,
    UnknownOperation,
    UnknownPool,
)

CONCRETE = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, FlagshipError) and cls.fields
]


def sample(cls: type[FlagshipError]) -> FlagshipError:
    values = {"in_flight": 2, "limit": 2, "timeout_s": 1.5, "known": ["a", "b"], "capabilities": ["deno"]}
    return cls(*[values.get(name, f"{name}-value") for name in cls.fields])


def test_every_error_has_one_root_and_a_message_naming_its_fields() -> None:
    assert len(CONCRETE) >= 20
    for cls in CONCRETE:
        exc = sample(cls)
        assert isinstance(exc, FlagshipError)
        assert all(str(getattr(exc, f)) in str(exc) or f == "known" for f in cls.fields), cls


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda c: c.__name__)
def test_error_round_trips_through_the_redis_result_backend(client: Client, cls: type[FlagshipError]) -> None:
    original = sample(cls)
    task_id = uuid.uuid4().hex
    client.app.backend.mark_as_failure(task_id, original)
    with pytest.raises(cls) as raised:
        client.app.AsyncResult(task_id).get(timeout=5)
    assert type(raised.value) is cls
    assert raised.value.as_dict() == original.as_dict()


def test_unknown_pool_is_typed_and_lists_the_known_pools(client: Client) -> None:
    with pytest.raises(UnknownPool) as raised:
        client.session("no_such_pool")
    assert "triage_pool" in raised.value.known


def test_unknown_session_is_typed(client: Client) -> None:
    with pytest.raises(SessionNotFound):
        client.attach("no-such-session")


def test_session_closed_by_another_producer_is_refused_by_the_worker(
    client: Client, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    pid = session.call("ping", timeout_s=10)["pid"]
    client.attach(session.id).close()
    with pytest.raises(SessionNotFound):
        session.call("ping", timeout_s=10)
    assert sessions("triage_pool", node=session.worker).call("ping", timeout_s=10)["pid"] == pid


def test_bad_input_is_typed_and_the_worker_keeps_serving(client: Client, sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    pid = session.call("ping", timeout_s=10)["pid"]
    with pytest.raises(InvalidArgument, match="JSON-serializable"):
        session.call("ping", sleep_s={1, 2, 3}, timeout_s=10)  # a set is not JSON
    with pytest.raises(InvalidArgument):
        session.call("ping", no_such_argument=1, timeout_s=10)
    with pytest.raises(InvalidArgument):
        session.call("ping", sleep_s="forever", timeout_s=10)
    with pytest.raises(UnknownOperation):
        session.call("__import__", name="os", timeout_s=10)
    assert session.call("ping", timeout_s=10)["pid"] == pid
    session.close()
    with pytest.raises(SessionClosed):
        session.call("ping")
