"""Build the LM a worker uses: a real provider through ``dspy.LM``, or the offline scripted LM.

Retries live here (with ``tenacity``) rather than in ``dspy.LM(num_retries=...)``:
DSPy's backoff is fixed (1 s, 2 s, 4 s, ...), while workers and tests need it
configurable, and callers across Celery need the project's typed errors
(``LMAuthError``, ``LMBadRequest``, ``LMUnavailable``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import dspy
from dspy.utils import exceptions as dspy_errors
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from routing.errors import LMAuthError, LMBadRequest, LMError, LMUnavailable
from routing.settings import env_number
from tasks.lm.dspy_caches import install_dspy_caches
from tasks.lm.engine_choice import EngineChoices
from tasks.lm.governance import GovernorSettings
from tasks.lm.history import HISTORY_CHARS
from tasks.lm.offline import OFFLINE_MODEL, OfflineLM

__all__ = ["LMSettings", "ProviderLM", "build_lm", "translate_lm_error", "is_transient"]

#: Model used when only ``GEMINI_API_KEY`` is set.
DEFAULT_GEMINI_MODEL = "gemini/gemini-flash-lite-latest"
#: Model name used for an OpenAI-compatible server when ``FLAGSHIP_LM`` is unset.
DEFAULT_LOCAL_MODEL = "openai/local-model"
#: Sent to an OpenAI-compatible server that needs no key, so an ambient OPENAI_API_KEY never leaks to it.
NO_KEY = "sk-no-key-required"

_AUTH_STATUS = {401, 403}
_BAD_REQUEST_STATUS = {400, 404, 405, 413, 422}
_TRANSIENT_STATUS = {408, 409, 425, 429}


@dataclass(frozen=True)
class LMSettings:
    """Which LM a worker builds; read from the environment only when ``from_env()`` is called."""

    model: str | None = None
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    #: Extra attempts after the first for transient provider errors.
    retries: int = 3
    #: First backoff delay; doubles per attempt up to ``backoff_max_s``.
    backoff_s: float = 1.0
    backoff_max_s: float = 20.0
    #: Per-request HTTP timeout.
    timeout_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 4000
    #: The fleet cache and fleet-wide limits (``FLAGSHIP_LM_CACHE``, ``FLAGSHIP_LM_LIMITS``, ...).
    governor: GovernorSettings = field(default_factory=GovernorSettings)
    #: Characters of each message kept by ``history_entries``.
    history_chars: int = HISTORY_CHARS
    #: Servers producers may point an LM at (``FLAGSHIP_LM_API_BASES``): ``scheme://host[:port][/path]``
    #: prefixes, or ``*``; the configured ``FLAGSHIP_LM_API_BASE`` is always allowed.
    allowed_api_bases: tuple[str, ...] = ()

    @property
    def offline(self) -> bool:
        return self.model is None

    @property
    def cache(self) -> bool:
        """Whether LMs cache: ``local`` (DSPy's per-process cache), or ``fleet`` on a worker that installed it."""
        from tasks.lm import governor

        mode = self.governor.cache
        return mode == "local" or (mode == "fleet" and governor.current() is not None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LMSettings:
        env = os.environ if env is None else env
        model = (env.get("FLAGSHIP_LM") or "").strip() or None
        api_base = (env.get("FLAGSHIP_LM_API_BASE") or "").strip() or None
        if model and model.lower().startswith("offline"):
            model, api_base = None, None
        elif model is None and api_base:
            model = DEFAULT_LOCAL_MODEL
        elif model is None and env.get("GEMINI_API_KEY"):
            model = DEFAULT_GEMINI_MODEL
        return cls(
            model=_provider_model(model, api_base), api_base=api_base,
            api_key=(env.get("FLAGSHIP_LM_API_KEY") or "").strip() or None,
            retries=env_number(env, "FLAGSHIP_LM_RETRIES", cls.retries, int),
            backoff_s=env_number(env, "FLAGSHIP_LM_BACKOFF_S", cls.backoff_s, float),
            backoff_max_s=env_number(env, "FLAGSHIP_LM_BACKOFF_MAX_S", cls.backoff_max_s, float),
            timeout_s=env_number(env, "FLAGSHIP_LM_TIMEOUT_S", cls.timeout_s, float),
            temperature=env_number(env, "FLAGSHIP_LM_TEMPERATURE", cls.temperature, float),
            max_tokens=env_number(env, "FLAGSHIP_LM_MAX_TOKENS", cls.max_tokens, int),
            governor=GovernorSettings.from_env(env),
            history_chars=env_number(env, "FLAGSHIP_LM_HISTORY_CHARS", cls.history_chars, int),
            allowed_api_bases=tuple(
                e.strip() for e in [env.get("FLAGSHIP_LM_API_BASE") or "",
                                    *(env.get("FLAGSHIP_LM_API_BASES") or "").split(",")] if e.strip()),
        )

    def api_base_allowed(self, api_base: str) -> bool:
        """Producers may point LMs only at servers the workers' operator allowed (no request forgery).

        A missing port in an allowed base allows any port; hosts are compared
        exactly and URLs with credentials are refused.
        """
        if api_base in self.allowed_api_bases or "*" in self.allowed_api_bases:
            return True
        try:
            url = urlsplit(api_base)
            port = url.port
        except ValueError:
            return False
        if url.username or url.password or not url.hostname:
            return False
        for entry in self.allowed_api_bases:
            allowed = urlsplit(entry)
            if (url.scheme, url.hostname) != (allowed.scheme, allowed.hostname):
                continue
            if allowed.port is not None and allowed.port != port:
                continue
            if url.path.startswith(allowed.path.rstrip("/")):
                return True
        return False


def _provider_model(model: str | None, api_base: str | None) -> str | None:
    """A bare model name served by an OpenAI-compatible server goes through the ``openai/`` route."""
    if model and api_base and "/" not in model:
        return f"openai/{model}"
    return model


# -- errors ---------------------------------------------------------------------


def _status(exc: BaseException) -> int | None:
    for name in ("status", "status_code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Rate limits, timeouts, 5xx and connection failures: worth another attempt."""
    if isinstance(exc, LMError):
        return False
    if dspy_errors.is_retryable_lm_error(exc) or isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    status = _status(exc)
    return status is not None and (status in _TRANSIENT_STATUS or status >= 500)


def translate_lm_error(model: str, exc: BaseException) -> LMError | None:
    """The project's typed error for a provider failure, or None when it is not one."""
    if isinstance(exc, LMError):
        return exc
    # DSPy appends multi-paragraph remedies for its own API; the first paragraph is the provider's word.
    message = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().split("\n\n")[0]
    status = _status(exc)
    auth = (dspy_errors.LMAuthError, dspy_errors.LMBillingError, dspy_errors.LMNotConfiguredError)
    bad = (dspy_errors.LMInvalidRequestError, dspy_errors.LMUnsupportedFeatureError,
           dspy_errors.LMConfigurationError)
    if isinstance(exc, auth) or status in _AUTH_STATUS:
        return LMAuthError(model, message)
    if isinstance(exc, bad) or status in _BAD_REQUEST_STATUS:
        return LMBadRequest(model, message)
    if is_transient(exc):
        return LMUnavailable(model, message)
    return None


class ProviderLM(dspy.LM):
    """``dspy.LM`` with configurable exponential backoff and the project's typed errors.

    Context-window errors pass through untranslated: DSPy modules catch them to
    shorten their prompts. Streaming calls are not retried (output may be visible).
    """

    def __init__(self, model: str, *, retries: int = 3, backoff_s: float = 1.0, backoff_max_s: float = 20.0,
                 **kwargs: Any) -> None:
        kwargs["num_retries"] = 0  # one attempt per call inside DSPy; the retry loop is ours
        install_dspy_caches()  # per-call lookups DSPy repeats with the same answer (prices, pydantic adapters)
        super().__init__(model, **kwargs)
        #: DSPy's engine choice kept per call shape (``tasks.lm.engine_choice``); copies share it.
        self._flagship_engine_choices = EngineChoices()
        self.retries, self.backoff_s, self.backoff_max_s = retries, backoff_s, backoff_max_s

    def dump_state(self) -> dict[str, Any]:
        return {**super().dump_state(), "retries": self.retries, "backoff_s": self.backoff_s,
                "backoff_max_s": self.backoff_max_s}

    def _retryable(self, exc: BaseException) -> bool:
        """Transient provider errors, except context-window errors and streaming calls (output may be visible)."""
        return (isinstance(exc, Exception) and not isinstance(exc, dspy_errors.ContextWindowExceededError)
                and is_transient(exc) and dspy.settings.send_stream is None)

    def _wait(self, state: RetryCallState) -> float:
        """``backoff_s * 2**n`` capped at ``backoff_max_s``; a longer ``retry_after`` hint wins, up to the cap."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (state.attempt_number - 1))
        hint = getattr(state.outcome.exception() if state.outcome else None, "retry_after", None)
        if isinstance(hint, (int, float)) and math.isfinite(hint) and hint > delay:
            delay = min(float(hint), self.backoff_max_s)
        return delay

    def _give_up(self, state: RetryCallState) -> NoReturn:
        exc = state.outcome.exception() if state.outcome else None
        last = (getattr(exc, "message", None) or str(exc)).strip().split("\n\n")[0]
        raise LMUnavailable(self.model, f"{state.attempt_number} attempts failed; last: {last}") from exc

    def _policy(self) -> dict[str, Any]:
        return {"stop": stop_after_attempt(self.retries + 1), "wait": self._wait,
                "retry": retry_if_exception(self._retryable), "retry_error_callback": self._give_up}

    def _typed(self, exc: Exception) -> Exception:
        """What to raise for ``exc``, which was not retried: its typed error, else ``exc`` itself."""
        if isinstance(exc, dspy_errors.ContextWindowExceededError):
            return exc  # DSPy modules catch it to shorten their prompts
        return translate_lm_error(self.model, exc) or exc

    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        try:
            return Retrying(**self._policy())(super().__call__, prompt, messages=messages, **kwargs)
        except Exception as exc:
            typed = self._typed(exc)
            if typed is exc:
                raise
            raise typed from exc

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        try:
            return await AsyncRetrying(**self._policy())(super().acall, prompt, messages=messages, **kwargs)
        except Exception as exc:
            typed = self._typed(exc)
            if typed is exc:
                raise
            raise typed from exc


def build_lm(model: str | None = None, temperature: float | None = None, max_tokens: int | None = None,
             api_base: str | None = None, api_key: str | None = None, settings: LMSettings | None = None,
             **extra: Any) -> dspy.BaseLM:
    """A provider LM for ``model`` (default: the configured one), or the offline LM when none is configured."""
    settings = settings or LMSettings.from_env()
    temperature = settings.temperature if temperature is None else temperature
    max_tokens = settings.max_tokens if max_tokens is None else max_tokens
    api_base = api_base or settings.api_base
    model = _provider_model(model, api_base) if model else settings.model
    if model is None or model.lower().startswith("offline"):
        return OfflineLM(model or OFFLINE_MODEL, temperature=temperature, max_tokens=max_tokens)
    extra.setdefault("cache", settings.cache)
    extra.setdefault("timeout", settings.timeout_s)
    retries = extra.pop("num_retries", settings.retries)
    if api_base:
        extra["api_base"] = api_base
        # The configured key goes only to the configured server, never to a caller-chosen one.
        own_key = settings.api_key if api_base == settings.api_base else None
        extra["api_key"] = api_key or own_key or NO_KEY
    elif api_key or settings.api_key:
        extra["api_key"] = api_key or settings.api_key
    return ProviderLM(model, temperature=temperature, max_tokens=max_tokens, retries=retries,
                      backoff_s=settings.backoff_s, backoff_max_s=settings.backoff_max_s, **extra)

