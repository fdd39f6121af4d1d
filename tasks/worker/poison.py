"""Malformed task messages: dead-lettered and acknowledged before Celery's strategy can choke on them.

Celery's consumer reads ``headers['task']``, builds a ``Request`` from
``headers['id']`` and leaves the body to the pool, with few guards: headers
without an id raise out of the consumer (which restarts, gets the same message
back, and restarts again), a body that is not ``[args, kwargs, embed]`` fails
deep in the pool, an unknown task is rejected with a traceback, and a
``flagship.call`` whose session id is not a string upsets the worker's
bookkeeping; a ``flagship.call`` with an ``eta`` (a countdown becomes one) would hold its
session's turn until then. :class:`MessageGuard` checks each message first (the envelope
itself was checked by the Redis channel, ``routing.broker.envelope``); what fails goes to
the dead-letter list (``routing.broker.deadletter``) with the reason, is acknowledged,
and is logged once. The checks read what Celery reads anyway: the decoded body is
cached on the message, so a good message costs a few ``isinstance`` calls.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from routing import names
from routing.broker.deadletter import DeadLetterSettings, Letter, dead_letter, deliveries, set_this_node

log = logging.getLogger(__name__)

#: Longest task id accepted (Celery's are 36-character UUIDs).
max_task_id_chars = 255
#: Optional protocol-2 headers Celery uses as given, and the types they must have when present.
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "shadow": (str,), "eta": (str,), "expires": (str,), "retries": (int,), "argsrepr": (str,),
    "kwargsrepr": (str,), "root_id": (str,), "parent_id": (str,), "group": (str,), "origin": (str,),
    "lang": (str,), "ignore_result": (bool,),
}
#: Argument types checked by name, beyond matching the task's signature.
ARGUMENT_TYPES: dict[str, dict[str, type]] = {
    names.CALL_TASK: {"session_id": str, "op": str, "kwargs": dict, "route": dict},
}


def _type_name(value: Any) -> str:
    return type(value).__name__


def _timelimit_problem(value: Any) -> str | None:
    if value is None:
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value)):
        return None
    return "header 'timelimit' is not [soft, hard] (numbers or null)"


class MessageGuard:
    """Tells whether a task message can be run, and dead-letters it when not."""

    def __init__(self, tasks: Mapping[str, Any], node: str, settings: DeadLetterSettings | None = None) -> None:
        #: Task name -> task: what this worker can run (the app's task registry).
        self.tasks = tasks
        self.node = node
        self.settings = settings or DeadLetterSettings.from_env()
        self._signatures: dict[str, inspect.Signature | None] = {}
        #: Tasks whose parameters are all plain positional ones without defaults (a full positional call binds 1:1).
        self._positional: set[str] = set()
        set_this_node(node)

    def problem(self, message: Any) -> str | None:
        """Why ``message`` cannot be run, or None if it can."""
        try:
            return self._problem(message)
        except Exception as exc:  # a check that fails is a reason too
            return f"message could not be checked ({_type_name(exc)}: {str(exc)[:200]})"

    def _problem(self, message: Any) -> str | None:
        headers = message.headers
        if not isinstance(headers, dict):
            return "headers are not an object"
        task, task_id = headers.get("task"), headers.get("id")
        if not isinstance(task, str) or not task:
            return "headers name no task (only Celery's message protocol 2 is accepted)"
        if not isinstance(task_id, str) or not task_id or len(task_id) > max_task_id_chars:
            return "headers carry no task id"
        if task not in self.tasks:
            return f"unknown task {task[:200]!r}"
        if (count := deliveries(headers)) >= self.settings.max_deliveries:
            return f"delivered {count} times without completing (limit {self.settings.max_deliveries})"
        for field, kinds in HEADER_TYPES.items():
            if (value := headers.get(field)) is not None and not isinstance(value, kinds):
                return f"header {field!r} is a {_type_name(value)}, not a {kinds[0].__name__}"
        if (wrong := _timelimit_problem(headers.get("timelimit"))) is not None:
            return wrong
        if task == names.CALL_TASK and headers.get("eta") is not None:
            return ("a session call takes no eta or countdown (header 'eta'): it would hold the session's turn "
                    "until then; the producer never sends one")
        try:
            body = message.decode()  # cached on the message: Celery's strategy reads the same object
        except Exception as exc:
            return f"body is not valid {message.content_type} ({_type_name(exc)}: {str(exc)[:200]})"
        if not (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[0], list)
                and isinstance(body[1], dict) and (body[2] is None or isinstance(body[2], dict))):
            return "body is not Celery's [args, kwargs, embed] (a list, an object, an object)"
        return self._arguments_problem(task, body[0], body[1])

    def _arguments_problem(self, task: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        signature = self._signature(task)
        if signature is None:
            return None
        params = signature.parameters
        if not kwargs and len(args) == len(params) and task in self._positional:
            arguments = dict(zip(params, args))  # the usual shape, without Signature.bind's cost
        else:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError as exc:
                return f"arguments do not match {task}({', '.join(params)}): {exc}"
        for name, kind in ARGUMENT_TYPES.get(task, {}).items():
            if name in arguments and not isinstance(arguments[name], kind):
                return f"argument {name!r} of {task} must be a {kind.__name__}, not {_type_name(arguments[name])}"
        return None

    def _signature(self, task: str) -> inspect.Signature | None:
        if task not in self._signatures:
            run = getattr(self.tasks.get(task), "run", None)
            try:
                signature = inspect.signature(run) if run is not None else None
            except (TypeError, ValueError):  # no signature to read: Celery checks the call itself
                signature = None
            self._signatures[task] = signature
            if signature is not None and all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
                                             for p in signature.parameters.values()):
                self._positional.add(task)
        return self._signatures[task]

    def dead_letter(self, message: Any, reason: str, broker_errors: tuple[type[BaseException], ...] = ()) -> None:
        """Move ``message`` to the dead-letter list (failing its call when it names one), then acknowledge it."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        letter = Letter(
            queue=str((message.delivery_info or {}).get("routing_key") or "?"), reason=reason, raw=_raw(message),
            task_id=_text(headers.get("id")), task=_text(headers.get("task")),
            reply_to=(message.properties or {}).get("reply_to") if isinstance(message.properties, dict) else None,
        )
        try:
            with message.channel.conn_or_acquire() as client:
                dead_letter(client, letter, self.settings)
        except broker_errors:
            raise  # not acknowledged: the message stays un-acked and comes back
        except Exception:
            log.error("could not dead-letter a message from %s (%s); dropping it", letter.queue, reason,
                      exc_info=True)
        message.ack()


def guarded(handle: Callable[[Any], Any], guard: MessageGuard,
            broker_errors: tuple[type[BaseException], ...]) -> Callable[[Any], Any]:
    """Celery's task handler behind ``guard``: a message it cannot run never reaches ``handle``."""

    def on_task_received(message: Any) -> Any:
        reason = guard.problem(message)
        if reason is not None:
            return guard.dead_letter(message, reason, broker_errors)
        try:
            return handle(message)
        except broker_errors:
            raise
        except Exception as exc:  # whatever Celery's strategy still raises must not restart the consumer
            if message.acknowledged:
                log.exception("task handler failed after the message was acknowledged")
                return None
            return guard.dead_letter(message, f"Celery could not take it ({_type_name(exc)}: {str(exc)[:200]})",
                                     broker_errors)

    return on_task_received


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _raw(message: Any) -> str | bytes:
    """The envelope as it was popped (kombu's virtual transports keep it), else the body."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        try:
            return json.dumps(raw)
        except (TypeError, ValueError):
            pass
    body = message.body
    return body if isinstance(body, str | bytes) else repr(body)


class PoisonGuarded:
    """Mixed into Celery's ``Consumer``: its task handler behind a :class:`MessageGuard`, and its own
    rejection paths (unknown, invalid, undecodable messages) dead-lettering instead of rejecting with a traceback.
    """

    app: Any
    hostname: str
    connection_errors: tuple[type[BaseException], ...]
    channel_errors: tuple[type[BaseException], ...]
    _guard: MessageGuard | None = None

    @property
    def poison_guard(self) -> MessageGuard:
        if self._guard is None:
            self._guard = MessageGuard(self.app.tasks, self.hostname)
        return self._guard

    @property
    def broker_errors(self) -> tuple[type[BaseException], ...]:
        return (*self.connection_errors, *self.channel_errors)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)  # type: ignore[misc]
        return guarded(handle, self.poison_guard, self.broker_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.poison_guard.dead_letter(message, "not a task message", self.broker_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.poison_guard.dead_letter(message, f"unknown task ({exc})", self.broker_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.poison_guard.dead_letter(message, f"invalid task ({_type_name(exc)}: {exc})", self.broker_errors)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.poison_guard.dead_letter(message, f"body could not be decoded ({_type_name(exc)}: {exc})",
                                      self.broker_errors)
