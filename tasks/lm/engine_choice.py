"""DSPy's engine choice for a text-only LM call, made once per call shape instead of on every call.

Before every call DSPy 3.4 chooses the engine (``dspy.clients.execution._select_engine``):
it builds a throwaway lm15 engine to resolve the model string, reads the
environment for gateway variables, and then *plans* the request, building the
whole wire request once (``LM15Engine.plan``) only to learn whether the native
engine would refuse it and LiteLLM should take it instead. The call then builds
the same wire request again to send it. On a worker this choice was ~13 % of
an LM call's CPU, more than sending the request and reading its answer.

For calls of one LM with the same options (model, client settings, generation
options) whose messages are plain text under the same roles, the choice cannot
differ: the native route's refusals depend on options and content *kinds*
(images, audio, tools, schemas), never on the words. So the first such call
goes through DSPy's own choice, and when that chose the native engine the
choice is kept: later calls build their canonical request and reuse the engine.
Everything else (a declared provider, a prompt-cache setting, non-text content,
unhashable options, async calls, custom engines, a LiteLLM fallback, a closed
engine) takes DSPy's path unchanged on every call.

Only LMs that carry an :class:`EngineChoices` (``ProviderLM``) are affected;
``install()`` is called by ``tasks.lm.dspy_caches.install_dspy_caches``. The
environment is read at the first call of a shape: a worker's does not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["EngineChoices", "install", "choice_key"]

#: Shapes kept per LM (and its copies); beyond it the oldest choice is dropped.
MAX_SHAPES = 256

#: Call options the choice never reads (neither ``select_backend`` nor the canonical request): a rollout id
#: per call must not make every call a new shape.
_NOT_IN_CHOICE = frozenset({"messages", "n", "rollout_id", "num_generations"})

_lock = threading.Lock()
_original: Callable[..., tuple[Any, Any, Any]] | None = None


class EngineChoices:
    """Engine choices of one LM and its copies (they share DSPy's engine store): key -> (engine, compat, provider).

    Copies made by pickling or ``deepcopy`` start empty: engines hold locks and sockets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._choices: dict[Hashable, tuple[Any, Any, Any]] = {}

    def get(self, key: Hashable) -> tuple[Any, Any, Any] | None:
        return self._choices.get(key)

    def put(self, key: Hashable, choice: tuple[Any, Any, Any]) -> None:
        with self._lock:
            if len(self._choices) >= MAX_SHAPES:
                self._choices.pop(next(iter(self._choices)))
            self._choices[key] = choice

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._choices.pop(key, None)

    def __len__(self) -> int:
        return len(self._choices)

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineChoices:
        return EngineChoices()

    def __reduce__(self) -> tuple[type[EngineChoices], tuple[()]]:
        return EngineChoices, ()


def _message_roles(messages: Any) -> tuple[str, ...] | None:
    """The roles of plain-text messages (``{"role": str, "content": str}``), or None for anything else."""
    if not isinstance(messages, list) or not messages:
        return None
    roles = []
    for message in messages:
        if (not isinstance(message, dict) or message.keys() - {"role", "content"}
                or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str)):
            return None
        roles.append(message["role"])
    return tuple(roles)


def choice_key(lm: Any, call: Any, asynchronous: bool) -> Hashable | None:
    """What DSPy's engine choice for ``call`` depends on, or None when it must be made afresh."""
    if (asynchronous or not getattr(call, "managed", False) or call.request is not None
            or getattr(lm, "_engine_spec", None) not in ("auto", "lm15") or getattr(lm, "_providers", ())):
        return None
    legacy = call.legacy
    if legacy.get("prompt_cache") is not None:
        return None
    roles = _message_roles(legacy.get("messages"))
    if roles is None:
        return None
    options = tuple(sorted((k, type(v).__name__, v) for k, v in legacy.items() if k not in _NOT_IN_CHOICE))
    key = (lm.model, lm.model_type, lm._engine_spec, options, roles)
    try:
        hash(key)
    except TypeError:  # a dict or list option (a raw JSON schema, tools): choose every time
        return None
    return key


def _native_choice(lm: Any, call: Any, backend: Any, request: Any, provider: Any) -> tuple[Any, Any, Any] | None:
    """What to keep from DSPy's choice: only the native engine of this LM's store, with its resolution's compat."""
    from dspy.clients.backend_selection import select_backend
    from dspy.clients.engines.lm15_engine import LM15Engine

    if request is None or not isinstance(backend, LM15Engine) or not _in_store(lm, backend):
        return None
    resolution = select_backend(lm, call.legacy).resolution
    if resolution is None:
        return None
    return backend, resolution.compat, provider


def _in_store(lm: Any, backend: Any) -> bool:
    """``backend`` is one of this LM's (and its copies') engines: ``lm.close()`` drops them from the store."""
    with lm._engine_lock:  # DSPy changes the store under it (new client settings, event loops, close())
        return any(engine is backend for engine in lm._engine_store.values())


def _live(lm: Any, backend: Any) -> bool:
    """The kept engine is still open and still this LM's."""
    return not getattr(backend, "_closed", True) and _in_store(lm, backend)


def choose_engine(lm: Any, call: Any, asynchronous: bool) -> tuple[Any, Any, Any]:
    """``_select_engine`` with the native choice kept per call shape (see the module docs)."""
    assert _original is not None
    choices = getattr(lm, "_flagship_engine_choices", None)
    key = choice_key(lm, call, asynchronous) if isinstance(choices, EngineChoices) else None
    if key is None:
        return _original(lm, call, asynchronous)
    assert isinstance(choices, EngineChoices)
    kept = choices.get(key)
    if kept is not None:
        backend, compat, provider = kept
        if _live(lm, backend):
            from dspy.clients.execution import _canonical

            try:
                return backend, _canonical(call, compat=compat), provider
            except Exception:  # DSPy's own path decides what a refused conversion means
                choices.drop(key)
                return _original(lm, call, asynchronous)
        choices.drop(key)  # closed with its LM: choose afresh below
    backend, request, provider = _original(lm, call, asynchronous)
    keep = _native_choice(lm, call, backend, request, provider)
    if keep is not None:
        choices.put(key, keep)
    return backend, request, provider


def install() -> None:
    """Route DSPy's engine choice through :func:`choose_engine` (idempotent, process-wide)."""
    global _original
    from dspy.clients import execution

    with _lock:
        if _original is not None:
            return
        _original = execution._select_engine
        execution._select_engine = choose_engine
