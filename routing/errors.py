"""Every error the system raises, under one root.

Each error keeps its fields in ``args`` (in ``fields`` order) so Celery's JSON
result backend can rebuild it on the producer as the same type with the same
fields: the worker stores ``exc.args`` and the producer calls ``cls(*args)``.
"""

from __future__ import annotations

from typing import Any


class FlagshipError(Exception):
    """Root of every error raised by pools, sessions, refs, sandboxes and operations."""

    #: Names of the constructor arguments, in order; each becomes an attribute.
    fields: tuple[str, ...] = ()
    #: ``str.format`` template over the fields.
    template = "{}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = list(args) + [kwargs.pop(name) for name in self.fields[len(args):] if name in kwargs]
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected fields {sorted(kwargs)}")
        super().__init__(*values)
        for name, value in zip(self.fields, values):
            setattr(self, name, value)
        for name in self.fields[len(values):]:
            setattr(self, name, None)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.fields}

    def __str__(self) -> str:
        if not self.fields:
            return super().__str__()
        return self.template.format(**self.as_dict())


# -- routing -----------------------------------------------------------------


class RoutingError(FlagshipError):
    """A call could not be placed on a worker."""


class UnknownPool(RoutingError):
    pool: str
    known: list[str]
    fields = ("pool", "known")
    template = "unknown pool {pool!r} (known pools: {known})"


class SessionNotFound(RoutingError):
    fields = ("session_id",)
    template = "session {session_id!r} does not exist (never opened, closed, or expired)"


class SessionClosed(RoutingError):
    fields = ("session_id",)
    template = "session {session_id!r} is closed"


class SessionWorkerUnavailable(RoutingError):
    session_id: str
    node: str
    fields = ("session_id", "node")
    template = (
        "worker {node!r} bound to strict session {session_id!r} is gone; "
        "its in-memory state is lost (reopen the session or call with rehydrate=True)"
    )


class WorkerBusy(RoutingError):
    session_id: str
    node: str
    in_flight: int
    limit: int
    fields = ("session_id", "node", "in_flight", "limit")
    template = "worker {node!r} of session {session_id!r} is busy ({in_flight}/{limit} in flight)"


class NoCapableWorker(RoutingError):
    pool: str
    capabilities: list[str]
    fields = ("pool", "capabilities")
    template = ("no live worker of pool {pool!r} has capabilities {capabilities} "
                "(`flagship up` starts every pool's workers; `flagship status` lists the live ones)")


class ServerUnavailable(RoutingError):
    fields = ("url", "reason")
    template = "Redis server {url} is unavailable: {reason}"


class QueueTimeout(RoutingError):
    """The call waited longer than its pool's ``queue_timeout_s`` to start; it was never run and never will be."""

    fields = ("session_id", "op", "timeout_s")
    template = "call {op!r} of session {session_id!r} did not start within {timeout_s} s; it will not run"


class PoolSaturated(RoutingError):
    """Too many calls already wait for this worker (or pool): refused at once, nothing was sent."""

    fields = ("pool", "node", "queued", "limit")
    template = "pool {pool!r} is saturated: {queued} call(s) already wait for {node} (limit {limit})"


# -- calls -------------------------------------------------------------------


class CallError(FlagshipError):
    """A call reached a worker (or was about to) and could not be carried out."""


class InvalidArgument(CallError):
    fields = ("op", "reason")
    template = "invalid argument for {op!r}: {reason}"


class UnknownOperation(CallError):
    fields = ("op", "known")
    template = "unknown operation {op!r} (allowed: {known})"


class OperationFailed(CallError):
    """An operation raised something outside this tree; its type and message travel as text."""

    fields = ("op", "error_type", "message")
    template = "{op!r} failed with {error_type}: {message}"


class UnknownProgram(CallError):
    """A program, tool or metric path that no module listed in the worker's ``FLAGSHIP_PROGRAMS`` defines."""

    fields = ("path", "reason")
    template = "unknown program {path!r}: {reason}"


class ProgramError(CallError):
    """A user's program raised inside ``forward`` (or a tool or metric did); the worker keeps serving."""

    fields = ("path", "error_type", "message", "traceback")
    template = "program {path!r} raised {error_type}: {message}\n{traceback}"


class CallCancelled(CallError):
    """The producer cancelled the call before it ran; it was skipped."""

    fields = ("session_id", "op")
    template = "call {op!r} of session {session_id!r} was cancelled before it ran"


class DeadLettered(CallError):
    """The call's message was malformed or kept failing delivery; it was moved to the dead-letter list, not run."""

    fields = ("task_id", "reason")
    template = "call {task_id} was dead-lettered: {reason}"


class CallTimeout(CallError):
    fields = ("session_id", "op", "timeout_s")
    template = "call {op!r} of session {session_id!r} got no result within {timeout_s} s"


class CallOutcomeUnknown(CallError):
    """Its send failed after it may have reached the server; it was neither found nor resent within a bound."""

    fields = ("session_id", "op", "reason")
    template = "call {op!r} of session {session_id!r} may or may not have run: {reason}"


# -- refs --------------------------------------------------------------------


class RefError(FlagshipError):
    """A stateful object handle could not be resolved."""


class RefNotFound(RefError):
    fields = ("ref_id", "session_id", "node")
    template = "ref {ref_id!r} of session {session_id!r} is not on worker {node!r}"


class RefSessionMismatch(RefError):
    fields = ("ref_id", "owner_session_id", "session_id")
    template = "ref {ref_id!r} belongs to session {owner_session_id!r}, not {session_id!r}"


class RefEvicted(RefError):
    fields = ("ref_id", "session_id", "limit")
    template = "ref {ref_id!r} of session {session_id!r} was evicted (worker holds at most {limit} refs)"


class InvalidSignature(RefError):
    fields = ("signature", "reason")
    template = "invalid signature {signature!r}: {reason}"


# -- language models ---------------------------------------------------------


class LMError(FlagshipError):
    """The language model provider refused or failed a request."""


class LMAuthError(LMError):
    fields = ("model", "message")
    template = "provider rejected the credentials for {model!r}: {message}"


class LMBadRequest(LMError):
    fields = ("model", "message")
    template = "provider rejected the request for {model!r}: {message}"


class LMUnavailable(LMError):
    fields = ("model", "message")
    template = "provider for {model!r} stayed unavailable after retries: {message}"


class RateLimited(LMError):
    fields = ("model", "reason")
    template = "no fleet capacity for {model!r} within the call's deadline: {reason}"


class BudgetExceeded(LMError):
    fields = ("scope", "spent", "budget")
    template = "the LM budget of {scope} is spent ({spent} of {budget}): no further LM calls"


# -- sandbox -----------------------------------------------------------------


class SandboxError(FlagshipError):
    """The code sandbox failed."""


class SandboxCrashed(SandboxError):
    """The interpreter process is dead; it must be replaced."""

    fields = ("reason",)
    template = "sandbox crashed: {reason}"


class SandboxTimeout(SandboxError):
    """Code ran past its wall-clock limit; the interpreter was killed."""

    fields = ("timeout_s",)
    template = "sandbox code ran longer than {timeout_s} s and was killed"


class SandboxClosed(SandboxCrashed):
    """The interpreter (or its pool) was shut down; like DSPy's, it never restarts: use a new one."""

    template = "sandbox is shut down: {reason}"


class CodeFailed(SandboxError):
    """The code raised inside the sandbox; the interpreter is still usable."""

    fields = ("error_type", "message")
    template = "sandbox code raised {error_type}: {message}"


# -- analytics ---------------------------------------------------------------


class AnalyticsError(FlagshipError):
    """Analytics input was rejected."""


class InvalidAnalyticsInput(AnalyticsError):
    fields = ("field", "reason")
    template = "invalid analytics input {field!r}: {reason}"


def error_to_json(exc: FlagshipError) -> dict[str, Any]:
    """An error as JSON (for per-item results of a batch, which travel inside one reply)."""
    return {"type": type(exc).__name__, "args": list(exc.args)}


def error_from_json(data: dict[str, Any]) -> FlagshipError:
    """The error :func:`error_to_json` described, as the same type with the same fields."""
    cls = globals().get(str(data.get("type")))
    args = list(data.get("args") or [])
    if isinstance(cls, type) and issubclass(cls, FlagshipError):
        return cls(*args)
    return OperationFailed("?", str(data.get("type")), " ".join(map(str, args)))


#: Every error class, by name (the names a worker may send back).
__all__ = sorted(name for name, value in dict(globals()).items()
                 if isinstance(value, type) and issubclass(value, FlagshipError))
