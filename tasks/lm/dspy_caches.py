"""Per-call work DSPy repeats with the same answer every time, cached (found by profiling a worker).

- **Prices.** After every LM call DSPy prices the response
  (``dspy.clients.costs.estimate_cost``) with ``model_metadata.model_info(provider,
  model)``, a copy of the model's entry in its price table. For a model the table
  does not list (any model behind a local OpenAI-compatible server) it scans the
  whole table for an alias, twice per call: ~1 ms each, the largest single cost
  of an LM call on a worker. The table is loaded once per process and never
  changes, so the answer per ``(provider, model, namespaces)`` is cached; callers
  still get their own copy, and ``cost`` in the history stays what DSPy computes
  (a number for priced models, None otherwise).
- **Pydantic adapters.** DSPy's adapters build a ``pydantic.TypeAdapter`` for every
  input value they format and every output they parse (``dspy.adapters.utils``);
  building one costs ~0.1 ms. A ``TypeAdapter`` is immutable and thread-safe, so
  one per type is reused.

- **Routes for pricing.** Pricing each response asks ``capabilities.resolve(lm)``
  for the model's route, building a throwaway lm15 engine and router each time
  (~1.5 % of a worker's LM call). With no declared providers the route depends on
  the model string and type only (no environment, no network), so it is cached.
- **Engine choice** (``tasks.lm.engine_choice``). DSPy chooses the engine before
  every call, planning the whole wire request once just to learn whether the
  native engine takes it; for text-only calls of one LM with the same options the
  choice is kept.

- **Proxy settings** (workers only, ``freeze_proxy_environment()``). DSPy's HTTP
  transport asks ``urllib.request.getproxies()`` on every request, which walks the
  whole environment (~0.1 ms). A worker reads its environment once, at start; the
  proxies it started with are kept.

``install_dspy_caches()`` is idempotent and process-wide; ``ProviderLM`` calls it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import TypeAdapter

from tasks.lm import engine_choice

__all__ = ["install_dspy_caches", "installed", "cached_model_info", "cached_type_adapter", "cached_route",
           "preload_prices", "freeze_proxy_environment"]

log = logging.getLogger(__name__)

#: Distinct answers kept per cache; the models and types a worker uses are few.
CACHE_SIZE = 1024

_lock = threading.Lock()
_original_model_info: Callable[..., dict[str, Any]] | None = None
#: Modules that imported ``model_info`` by name (each holds its own reference to replace).
_MODEL_INFO_USERS = ("dspy.clients.costs", "dspy.clients.capabilities")


@functools.lru_cache(maxsize=CACHE_SIZE)
def _model_info(provider: Any, model: Any, namespaces: tuple[str, ...] | None) -> dict[str, Any]:
    assert _original_model_info is not None
    return _original_model_info(provider, model, namespaces=namespaces)


def cached_model_info(provider: Any, model: Any, *, namespaces: Iterable[str] | None = None) -> dict[str, Any]:
    """``model_metadata.model_info`` with the answer cached per model (a fresh copy each time)."""
    assert _original_model_info is not None, "install_dspy_caches() first"
    key = None if namespaces is None else tuple(namespaces)
    try:
        found = _model_info(provider, model, key)
    except TypeError:  # an unhashable argument: no caching, same answer
        return _original_model_info(provider, model, namespaces=namespaces)
    return copy.deepcopy(found)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _type_adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def cached_type_adapter(annotation: Any, *args: Any, **kwargs: Any) -> TypeAdapter[Any]:
    """``pydantic.TypeAdapter(annotation)``, one per (hashable) type; other calls build a new one as before."""
    if args or kwargs:
        return TypeAdapter(annotation, *args, **kwargs)
    try:
        hash(annotation)
    except TypeError:
        return TypeAdapter(annotation)
    return _type_adapter(annotation)


_original_route: Callable[[Any], Any] | None = None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _route(model: str, model_type: str) -> Any:
    assert _original_route is not None
    return _original_route(_RouteOf(model, model_type))


class _RouteOf:
    """What ``capabilities.resolve`` reads of an LM without declared providers."""

    _providers = ()

    def __init__(self, model: str, model_type: str) -> None:
        self.model, self.model_type = model, model_type


def cached_route(lm: Any) -> Any:
    """``capabilities.resolve(lm)`` (an immutable lm15 ``Resolution``), cached per model when nothing is declared."""
    assert _original_route is not None, "install_dspy_caches() first"
    model, model_type = getattr(lm, "model", None), getattr(lm, "model_type", None)
    if getattr(lm, "_providers", ()) or not isinstance(model, str) or not isinstance(model_type, str):
        return _original_route(lm)
    return _route(model, model_type)


def install_dspy_caches() -> None:
    """Route DSPy's price lookups and its adapters' ``TypeAdapter`` builds through the caches above."""
    global _original_model_info, _original_route
    if _original_model_info is not None:
        return
    from dspy.adapters import utils as adapter_utils
    from dspy.clients import capabilities, model_metadata

    with _lock:
        if _original_model_info is not None:
            return
        original = _original_model_info = model_metadata.model_info
        for name in _MODEL_INFO_USERS:
            module = importlib.import_module(name)
            if getattr(module, "model_info", None) is original:
                module.model_info = cached_model_info  # type: ignore[attr-defined]
        if adapter_utils.TypeAdapter is TypeAdapter:
            adapter_utils.TypeAdapter = cached_type_adapter  # type: ignore[assignment, misc]
        if _original_route is None:
            _original_route = capabilities.resolve
            capabilities.resolve = cached_route
    engine_choice.install()


def installed() -> bool:
    return _original_model_info is not None


def preload_prices() -> None:
    """Load DSPy's price table now (it loads on the first priced call otherwise), e.g. before ``gc.freeze()``."""
    from dspy.clients.model_metadata import source_info

    source_info()


def freeze_proxy_environment() -> None:
    """DSPy's transport uses the proxy variables this process has now, without re-reading the environment."""
    try:
        from dspy._vendor.lm15.transports import _proxy
    except ImportError:  # another DSPy layout: keep its behaviour
        log.debug("DSPy's proxy lookup not found; proxies are read per request")
        return
    if getattr(_proxy, "getproxies", None) is not urllib.request.getproxies:
        return
    proxies = urllib.request.getproxies()
    _proxy.getproxies = lambda: dict(proxies)
