"""Producer-side handles on DSPy objects that live in a worker's memory.

A handle is JSON (ref id, session id, worker, kind); calling it sends the
``call`` operation to the session's worker. Nothing here imports DSPy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from routing import names, validate
from routing.errors import InvalidArgument
from routing.producer.future import CallFuture
from routing.producer.prediction import History, Prediction
from routing.producer.streams import AsyncCallStream, CallStream
from routing.program_state import read_state


class SessionCalls(Protocol):
    """What a module handle needs of its session (:class:`~routing.producer.session.Session` provides it)."""

    @property
    def id(self) -> str: ...

    def submit(self, op: str, /, **kwargs: Any) -> CallFuture: ...

    def submit_decoded(self, op: str, kwargs: dict[str, Any], decode: Callable[[Any], Any] | None, *,
                       rehydrate: bool | None = None) -> CallFuture: ...

    def call(self, op: str, /, *, timeout_s: float | None = None, **kwargs: Any) -> Any: ...

    def release(self, ref: RefHandle | ModuleRef) -> None: ...

    def map(self, op: str, kwargs_list: Iterable[dict[str, Any]], *, return_exceptions: bool = False,
            chunk_size: int | None = None, num_threads: int = 1, timeout_s: float | None = None) -> list[Any]: ...

    async def acall(self, op: str, /, **kwargs: Any) -> Any: ...

    async def amap(self, op: str, kwargs_list: Iterable[dict[str, Any]], *, return_exceptions: bool = False,
                   chunk_size: int | None = None, num_threads: int = 1) -> list[Any]: ...


@dataclass(frozen=True)
class RefHandle:
    ref_id: str
    session_id: str
    worker: str
    kind: str
    #: What the worker said about the object when it was made (model, fields, ...).
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> Self:
        core = {k: reply[k] for k in ("ref_id", "session_id", "worker", "kind")}
        return cls(**core, info={k: v for k, v in reply.items() if k not in core})

    def as_json(self) -> dict[str, Any]:
        return {"ref_id": self.ref_id, "session_id": self.session_id, "worker": self.worker, "kind": self.kind}


class LMRef(RefHandle):
    """An LM on the worker; pass it as ``lm=`` when creating modules."""

    @property
    def model(self) -> str:
        """The LM's model string (``"offline/scripted"`` for the offline scripted LM)."""
        return str(self.info.get("model", ""))

    @property
    def offline(self) -> bool:
        """Whether this is the offline scripted LM (no provider configured on the worker)."""
        return bool(self.info.get("offline"))


class ContextRef(RefHandle):
    """A long text held on the worker (``session.context(text)``): pass it as a module input.

    It travels as ``{"$ref": ref_id}`` (kombu's ``__json__`` hook, or ``as_input``),
    so a repeated query over a 10 MB log sends only this handle.
    """

    @property
    def chars(self) -> int:
        """Length of the held text, in characters."""
        return int(self.info.get("chars", 0))

    def as_input(self) -> dict[str, str]:
        """The handle as a module input: ``{"$ref": ref_id}``, resolved to the text on the worker."""
        return {"$ref": self.ref_id}

    def __repr__(self) -> str:  # short: it is part of every call's argsrepr
        return f"ContextRef({self.ref_id!r})"

    def __json__(self) -> dict[str, str]:
        return self.as_input()


def prediction_of(reply: Any) -> Prediction:
    """A module call's reply as the ``Prediction`` of its output fields."""
    return Prediction(reply["outputs"])


class ModuleRef:
    """A callable module (Predict, ChainOfThought, RLM, a program) bound to its session."""

    def __init__(self, session: SessionCalls, handle: RefHandle) -> None:
        self.session = session
        self.handle = handle

    @property
    def ref_id(self) -> str:
        """The id of the module in its worker's memory."""
        return self.handle.ref_id

    @property
    def path(self) -> str | None:
        """The program's path (``"package.module:Name"``, ``"dspy:ReAct"``); None for other module refs."""
        path = self.handle.info.get("path")
        return path if isinstance(path, str) else None

    def __repr__(self) -> str:
        return f"<{self.handle.kind} {self.path or self.ref_id} ref={self.ref_id} session={self.session.id}>"

    def __json__(self) -> dict[str, str]:
        """As a constructor argument (``module=`` of ``dspy:BestOfN``): the ref, resolved on the worker."""
        return {"$ref": self.ref_id}

    def call_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The ``call`` operation's arguments for ``inputs``."""
        path = self.path  # shown in Flower's args (``program='pkg.mod:Name'``) and checked by the worker
        return {"ref": self.ref_id, **({"program": path} if path else {}), "inputs": inputs}

    def submit(self, **inputs: Any) -> CallFuture:
        """Send the call now; ``.result()`` returns the same ``Prediction`` a call does."""
        return self.session.submit_decoded("call", self.call_kwargs(inputs), prediction_of)

    def __call__(self, *, timeout: float | None = None, timeout_s: float | None = None, **inputs: Any) -> Prediction:
        """The module's output fields (``reasoning`` included where the module has it): ``pred.category``."""
        return prediction_of(self.session.call("call", **self.call_kwargs(inputs), timeout_s=timeout_s or timeout))

    async def acall(self, **inputs: Any) -> Prediction:
        """``await module.acall(ticket=...)``: DSPy's async spelling, no thread held while it runs."""
        return prediction_of(await self.session.acall("call", **self.call_kwargs(inputs)))

    def stream(self, *, fields: list[str] | None = None, **inputs: Any) -> CallStream:
        """The call's output ``fields`` as the LM writes them (default: the last predictor's string outputs).

        An iterator (and context manager) of ``StreamChunk``/``StreamStatus`` items, then the final
        ``Prediction``, in ``dspy.streamify``'s order; ``close()`` (or leaving the ``with``) cancels the call.
        """
        future, key = self._streamed(inputs, fields)
        return CallStream(future, future.router.results.streams, key, future.id)

    def astream(self, *, fields: list[str] | None = None, **inputs: Any) -> AsyncCallStream:
        """``stream`` for asyncio: ``async for item in module.astream(...)``; ``aclose()`` cancels."""
        asyncio.get_running_loop()  # outside a running loop: a RuntimeError before anything is sent
        future, key = self._streamed(inputs, fields)
        return AsyncCallStream(future, future.router.results.streams, key, future.id)

    def _streamed(self, inputs: dict[str, Any], fields: Any) -> tuple[CallFuture, str]:
        known = self.handle.info.get("outputs") if self.handle.kind in ("predict", "chain_of_thought") else None
        if fields is not None:
            fields = validate.field_names(fields, "stream", known and [*known, "reasoning"])
        future = self.session.submit_decoded("call", {**self.call_kwargs(inputs), "stream": {"fields": fields}},
                                             prediction_of)
        return future, names.call_stream(future.id)  # a rerun under a new task id writes here too (future.py)

    def dump_state(self) -> dict[str, Any]:
        """The worker-held module's state (DSPy's ``dump_state()`` JSON): save it, load it elsewhere with ``state=``.

        A program's recipe keeps this state from now on, so a rehydrated session rebuilds it as it is now.
        """
        reply: dict[str, Any] = self.session.call("dump_state", ref=self.ref_id)
        return dict(reply["state"])

    def batch(self, examples: Iterable[dict[str, Any]], *, num_threads: int = 16, return_exceptions: bool = False,
              chunk_size: int | None = None, timeout_s: float | None = None) -> list[Any]:
        """The module over many inputs (DSPy's ``Module.batch``): each example's outputs, in order.

        Examples travel in chunks; on the worker ``num_threads`` of them run at
        once. A failing example raises its typed error once all ran, or stands
        in its place with ``return_exceptions=True``.
        """
        checked = validate.item_list(examples, "batch", "examples")
        items = [self.call_kwargs(example) for example in checked]
        replies = self.session.map("call", items, return_exceptions=return_exceptions, chunk_size=chunk_size,
                                   num_threads=num_threads, timeout_s=timeout_s)
        return [reply if isinstance(reply, Exception) else prediction_of(reply) for reply in replies]

    async def abatch(self, examples: Iterable[dict[str, Any]], *, num_threads: int = 16,
                     return_exceptions: bool = False, chunk_size: int | None = None) -> list[Any]:
        """``batch`` for asyncio."""
        checked = validate.item_list(examples, "batch", "examples")
        items = [self.call_kwargs(example) for example in checked]
        replies = await self.session.amap("call", items, return_exceptions=return_exceptions,
                                          chunk_size=chunk_size, num_threads=num_threads)
        return [reply if isinstance(reply, Exception) else prediction_of(reply) for reply in replies]

    def release(self) -> None:
        """Free the module on the worker (the session's other objects stay)."""
        self.session.release(self.handle)


def ref_of(op: str, name: str, handle: Any, optional: bool = True) -> str | None:
    """The ref id of a handle argument (``None`` allowed when ``optional``); anything else is refused."""
    if handle is None and optional:
        return None
    if not isinstance(handle, RefHandle):
        raise InvalidArgument(op, f"{name} must be a ref handle{' or None' if optional else ''}, "
                                  f"got {type(handle).__name__}")
    return handle.ref_id


class RefMethods:
    """The DSPy-facing part of :class:`~routing.producer.session.Session`."""

    def call(self, op: str, /, *, timeout_s: float | None = None, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def lm(self, model: str | None = None, *, temperature: float | None = None, max_tokens: int | None = None,
           api_base: str | None = None, api_key: str | None = None, default: bool = False) -> LMRef:
        """A ``dspy.LM`` for this session (the first one becomes the session default)."""
        reply = self.call("lm", model=model, temperature=temperature, max_tokens=max_tokens, api_base=api_base,
                          api_key=api_key, default=default)
        return LMRef.from_reply(reply)

    def context(self, text: str) -> ContextRef:
        """Keep ``text`` on the worker (rebuilt from a stored copy on rehydration); use it as a module input."""
        return ContextRef.from_reply(self.call("context", text=text))

    def configure(self, lm: RefHandle) -> None:
        """Make ``lm`` the session default: ``dspy.configure(lm=...)`` scoped to this session."""
        self.call("set_default_lm", lm=ref_of("set_default_lm", "lm", lm, optional=False))

    def _module(self, kind: str, signature: str | dict[str, Any], lm: RefHandle | None,
                instructions: str | None) -> ModuleRef:
        reply = self.call(kind, signature=signature, lm=ref_of(kind, "lm", lm), instructions=instructions)
        return ModuleRef(self, RefHandle.from_reply(reply))  # type: ignore[arg-type]

    def predict(self, signature: str | dict[str, Any], *, lm: RefHandle | None = None,
                instructions: str | None = None) -> ModuleRef:
        """A ``dspy.Predict(signature)`` on the session's worker (``"ticket -> category, urgency"``)."""
        return self._module("predict", signature, lm, instructions)

    def chain_of_thought(self, signature: str | dict[str, Any], *, lm: RefHandle | None = None,
                         instructions: str | None = None) -> ModuleRef:
        """A ``dspy.ChainOfThought(signature)`` on the session's worker: its outputs include ``reasoning``."""
        return self._module("chain_of_thought", signature, lm, instructions)

    def rlm(self, signature: str = "context, query -> output", *, max_iters: int = 4, max_llm_calls: int = 12,
            max_output_chars: int = 4000, lm: RefHandle | None = None, sub_lm: RefHandle | None = None) -> ModuleRef:
        """A ``dspy.RLM`` on an RLM worker; its code runs in that worker's Deno sandbox."""
        reply = self.call("rlm", signature=signature, max_iters=max_iters, max_llm_calls=max_llm_calls,
                          max_output_chars=max_output_chars, lm=ref_of("rlm", "lm", lm),
                          sub_lm=ref_of("rlm", "sub_lm", sub_lm))
        return ModuleRef(self, RefHandle.from_reply(reply))  # type: ignore[arg-type]

    def program(self, path: str, *, state: Any = None, lm: RefHandle | None = None,
                **init_kwargs: Any) -> ModuleRef:
        """Your own DSPy program (or one of DSPy's modules) on the session's worker, named, never sent.

        ``path``: ``"package.module:Name"`` from a package the workers list in ``FLAGSHIP_PROGRAMS``
        (a ``dspy.Module`` subclass, or a function returning one), or ``"dspy:ReAct"`` and the other DSPy
        modules. ``init_kwargs`` (JSON) go to its constructor; functions among them (``tools``,
        ``reward_fn``) are ``"package.module:function"`` paths, a module is a path or a ``ModuleRef``.
        ``state``: ``module.dump_state()``'s dict, or ``module.save("x.json")``'s text or file, applied
        with DSPy's ``load_state``. ``lm``: the program's LM (default: the session's).
        """
        init = {name: value.__json__() if isinstance(value, ModuleRef) else value
                for name, value in init_kwargs.items()}
        reply = self.call("program", path=path, init=init, state=read_state(state), lm=ref_of("program", "lm", lm))
        return ModuleRef(self, RefHandle.from_reply(reply))  # type: ignore[arg-type]

    def release(self, ref: RefHandle | ModuleRef) -> None:
        """Free one object (an LM, a module, a context) on the worker."""
        handle = ref.handle if isinstance(ref, ModuleRef) else ref
        self.call("release_ref", ref=ref_of("release_ref", "ref", handle, optional=False))

    def refs(self) -> list[RefHandle]:
        """Handles on every object the session holds on its worker."""
        return [RefHandle.from_reply(r) for r in self.call("refs")]

    def history(self, lm: RefHandle | None = None, n: int = 6) -> History:
        """The session's last ``n`` LM calls (of ``lm`` only, if given), read on the worker that owns them.

        A list of JSON-safe entries, oldest first (``history[-1]["usage"]``), with ``.worker``, ``.complete``
        and ``.note``; ``history.inspect()`` prints them as ``dspy.inspect_history`` does.
        """
        return History.from_reply(self.call("history", lm=ref_of("history", "lm", lm), n=n))
