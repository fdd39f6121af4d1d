"""A module call streamed: DSPy's ``streamify`` on the worker, each chunk appended to the call's Redis stream.

``call(..., stream={"fields": [...]})`` runs the module through ``dspy.streamify`` with one
``StreamListener`` per field and ``XADD``\\ s every chunk and status message to
:func:`routing.names.call_stream` of the call's task id (bounded, expiring with the call's
result), then an end entry; the final ``Prediction`` still travels as the call's result,
stored after the end entry. Between chunks the call checks whether its producer revoked it
(``close()`` on the stream): the module's next LM request then raises (the one in flight
finishes, unread), and the call ends with ``CallCancelled`` once the module's run has, so the
session's next call never runs beside it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import dspy
from celery.worker import state as celery_state
from dspy.streaming import StatusMessage, StreamListener, StreamResponse
from redis import Redis

from routing.errors import CallCancelled, InvalidArgument
from tasks.lm.governor import stop_requests

log = logging.getLogger(__name__)

#: How long a cancelled call waits for its module's run to end (its LM request in flight finishes first).
cancel_wait_s = 60.0
#: Entries a call's stream keeps (``XADD MAXLEN ~``): older chunks are trimmed on a runaway answer.
stream_max_len = 10_000


@dataclass(frozen=True)
class StreamTarget:
    """Where a streamed call writes: its key, the fields asked for (None: the default), who it is."""

    redis: Redis
    key: str
    call_id: str
    session_id: str
    fields: list[str] | None
    ttl_s: int

    def add(self, entry: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.key, {"e": json.dumps(entry)}, maxlen=stream_max_len, approximate=True)
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()


_target: contextvars.ContextVar[StreamTarget | None] = contextvars.ContextVar("flagship_stream", default=None)


def parse(op: str, stream: Any) -> tuple[list[str] | None, str | None]:
    """The ``stream`` argument's field names (None: the module's default) and stream id (None: the task id's)."""
    if not isinstance(stream, dict) or set(stream) - {"fields", "id"}:
        raise InvalidArgument(op, 'stream must be {"fields": [names] or null, "id": task id (optional)}')
    fields, stream_id = stream.get("fields"), stream.get("id")
    if fields is not None and (not isinstance(fields, list) or not fields
                               or not all(isinstance(f, str) and f for f in fields)):
        raise InvalidArgument(op, "stream fields must be a non-empty list of output field names")
    if stream_id is not None and not (isinstance(stream_id, str) and re.fullmatch(r"[0-9a-f-]{32,36}", stream_id)):
        raise InvalidArgument(op, "stream id must be a task id (a UUID)")
    return fields, stream_id


@contextmanager
def streamed(target: StreamTarget | None) -> Iterator[None]:
    """Module runs inside stream to ``target`` (None: not streamed); the end entry follows a normal exit."""
    if target is None:
        yield
        return
    token = _target.set(target)
    try:
        yield
    finally:
        _target.reset(token)
    target.add({"t": "end"})


def take() -> StreamTarget | None:
    """The stream the current module run writes to (once: a module nested in it runs plainly)."""
    target = _target.get()
    if target is not None:
        _target.set(None)
    return target


def _string_outputs(predictor: Any) -> list[str]:
    return [name for name, info in predictor.signature.output_fields.items() if info.annotation is str]


def listeners(module: Any, fields: list[str] | None) -> list[StreamListener]:
    """One listener per field, on the last predictor with it as a string output (default: the last predictor's)."""
    named = list(module.named_predictors())
    if not named:
        raise InvalidArgument("call", "this module has no predictor to stream")
    if fields is None:
        name, predictor = named[-1]
        if not _string_outputs(predictor):
            raise InvalidArgument("call", f"the last predictor ({name}) has no string output to stream; name fields=")
        return [StreamListener(field, predict=predictor, predict_name=name) for field in _string_outputs(predictor)]
    found = []
    for field in fields:
        owner = next(((n, p) for n, p in reversed(named) if field in _string_outputs(p)), None)
        if owner is None:
            known = sorted({f for _, p in named for f in _string_outputs(p)})
            raise InvalidArgument("call", f"cannot stream {field!r}: not a string output of any predictor; "
                                          f"string outputs: {known}")
        found.append(StreamListener(field, predict=owner[1], predict_name=owner[0]))
    return found


class _Threaded:
    """The module as streamify's async program: run in an anyio worker thread of the stream's own loop.

    (DSPy's ``asyncify`` shares one process-wide ``CapacityLimiter`` across the event loops of concurrent
    sync streams; each stream here has its own loop.) Whatever the module returns is kept; streamify gets a
    ``Prediction`` either way (a program may return a dict).
    """

    def __init__(self, module: Any) -> None:
        self.module = module
        self.result: Any = None
        #: Set when the module's run ended (returned or raised), wherever it ran.
        self.ended = threading.Event()

    def named_predictors(self) -> Any:
        return self.module.named_predictors()

    async def acall(self, **inputs: Any) -> dspy.Prediction:
        run = functools.partial(contextvars.copy_context().run, self._run, inputs)
        self.result = await anyio.to_thread.run_sync(run)
        return self.result if isinstance(self.result, dspy.Prediction) else dspy.Prediction()

    def _run(self, inputs: dict[str, Any]) -> Any:
        try:
            return self.module(**inputs)
        finally:
            self.ended.set()


class _Earlier:
    """What an earlier run of this call streamed (a rerun after its worker was lost has the same task id and
    stream): the rerun writes only what goes beyond it, so its caller gets every piece once."""

    def __init__(self, entries: list[Any]) -> None:
        self.sent: dict[tuple[str, Any], str] = {}
        self.statuses = 0
        for _, fields in entries:
            try:
                entry = json.loads(fields.get(b"e") or fields.get("e"))
            except (TypeError, ValueError):
                continue
            if entry.get("t") == "chunk":
                key = (entry.get("field"), entry.get("predictor"))
                self.sent[key] = self.sent.get(key, "") + str(entry.get("text", ""))
            self.statuses += entry.get("t") == "status"
        self.produced = dict.fromkeys(self.sent, "")
        self.emitted = {key: len(text) for key, text in self.sent.items()}
        self.differs: set[tuple[str, Any]] = set()

    def chunk(self, key: tuple[str, Any], text: str) -> tuple[str, bool]:
        """The part of ``text`` not streamed yet, and whether this field's answer just turned out different."""
        if key in self.differs or key not in self.sent:
            return text, False
        produced = self.produced[key] = self.produced[key] + text
        if self.sent[key].startswith(produced):
            return "", False  # streamed by the earlier run
        if produced.startswith(self.sent[key]):
            new, self.emitted[key] = produced[self.emitted[key]:], len(produced)
            return new, False
        self.differs.add(key)  # the rerun wrote something else: this field starts over
        return produced, True

    def status(self) -> bool:
        """Whether the next status message is new (the earlier run's come again, in the same order)."""
        self.statuses -= 1
        return self.statuses < 0


def run(target: StreamTarget, module: Any, inputs: dict[str, Any]) -> Any:
    """Run ``module(**inputs)`` through ``dspy.streamify``, writing its chunks to ``target``; its result."""
    earlier = _Earlier(target.redis.xrange(target.key))
    program = _Threaded(module)
    streaming = dspy.streamify(program, stream_listeners=listeners(module, target.fields),  # type: ignore[arg-type]
                               include_final_prediction_in_output_stream=True, is_async_program=True,
                               async_streaming=False)
    stop = threading.Event()
    token = stop_requests.set(stop)  # before streamify copies the context for the module's thread (first item)
    items = streaming(**inputs)
    try:
        for value in items:
            if target.call_id in celery_state.revoked:
                # The module's next LM request raises; the session's next call waits until the run has ended.
                stop.set()
                if not program.ended.wait(cancel_wait_s):
                    log.warning("cancelled call %s: its module still runs after %.0f s", target.call_id, cancel_wait_s)
                raise CallCancelled(target.session_id, "call")
            if isinstance(value, StreamResponse) and value.chunk:
                field, predictor = value.signature_field_name, value.predict_name
                text, differs = earlier.chunk((field, predictor), value.chunk)
                if differs:
                    target.add({"t": "status", "message": f"the call runs again after its worker was lost and "
                                f"{field!r} came out different: it starts over"})
                if text:
                    target.add({"t": "chunk", "field": field, "text": text, "predictor": predictor})
            elif isinstance(value, StatusMessage) and earlier.status():
                target.add({"t": "status", "message": value.message})
    finally:
        stop_requests.reset(token)
        items.close()
    return program.result
