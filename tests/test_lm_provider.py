"""build_lm over real HTTP: the dspy.LM client against a local OpenAI-protocol server with scripted failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import dspy
import pytest
from dspy.utils import exceptions as dspy_errors
from fake_openai import FakeOpenAI

from routing.errors import LMAuthError, LMBadRequest, LMUnavailable
from tasks.lm.history import history_entries
from tasks.lm.offline import OfflineLM
from tasks.lm.provider import (
    DEFAULT_GEMINI_MODEL,
    NO_KEY,
    LMSettings,
    ProviderLM,
    build_lm,
    translate_lm_error,
)

TICKET = "Checkout is down: every request returns 502 for all customers."


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _settings(server: FakeOpenAI, **env: str) -> LMSettings:
    base = {"FLAGSHIP_LM": "fake-model", "FLAGSHIP_LM_API_BASE": server.base_url, "FLAGSHIP_LM_API_KEY": "sk-test",
            "FLAGSHIP_LM_RETRIES": "2", "FLAGSHIP_LM_BACKOFF_S": "0.01", "FLAGSHIP_LM_TIMEOUT_S": "5"}
    return LMSettings.from_env({**base, **env})


# -- settings ----------------------------------------------------------------------


def test_no_provider_configured_means_offline() -> None:
    settings = LMSettings.from_env({})
    assert settings.offline and settings.model is None
    assert isinstance(build_lm(settings=settings), OfflineLM)
    assert LMSettings.from_env({"FLAGSHIP_LM": "offline", "GEMINI_API_KEY": "k"}).offline


def test_gemini_key_alone_selects_the_default_gemini_model() -> None:
    settings = LMSettings.from_env({"GEMINI_API_KEY": "k"})
    assert settings.model == DEFAULT_GEMINI_MODEL and not settings.offline


def test_api_base_with_a_bare_model_name_uses_the_openai_route() -> None:
    settings = LMSettings.from_env({"FLAGSHIP_LM": "qwen2.5", "FLAGSHIP_LM_API_BASE": "http://127.0.0.1:8000/v1"})
    assert settings.model == "openai/qwen2.5"
    kept = LMSettings.from_env({"FLAGSHIP_LM": "hosted_vllm/qwen", "FLAGSHIP_LM_API_BASE": "http://h/v1"})
    assert kept.model == "hosted_vllm/qwen"
    assert "api_key" not in repr(LMSettings.from_env({"FLAGSHIP_LM_API_KEY": "secret"}))


def test_invalid_numeric_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="FLAGSHIP_LM_RETRIES"):
        LMSettings.from_env({"FLAGSHIP_LM_RETRIES": "many"})


# -- the real HTTP client path -------------------------------------------------------


def test_real_lm_returns_predictions_over_http(server: FakeOpenAI) -> None:
    lm = build_lm(settings=_settings(server))
    assert isinstance(lm, dspy.LM) and lm.model == "openai/fake-model" and lm.cache is False
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought("ticket -> category, urgency, action")(ticket=TICKET)
    assert (pred.category, pred.urgency) == ("outage", "high")
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body["model"] == "fake-model"
    assert TICKET in request.messages[-1]["content"]


def test_identical_calls_are_not_served_from_cache(server: FakeOpenAI) -> None:
    lm = build_lm(settings=_settings(server))
    lm("same prompt")
    lm("same prompt")
    assert len(server.requests) == 2


def test_rate_limited_twice_then_ok_succeeds_after_retries(server: FakeOpenAI) -> None:
    server.fail(429, times=2)
    [text] = build_lm(settings=_settings(server))("hello")
    assert text.startswith("[offline]")
    assert len(server.requests) == 3


def test_server_error_is_retried(server: FakeOpenAI) -> None:
    server.fail(503)
    build_lm(settings=_settings(server))("hello")
    assert len(server.requests) == 2


def test_rate_limit_outlasting_retries_is_unavailable(server: FakeOpenAI) -> None:
    server.always(429)
    with pytest.raises(LMUnavailable) as caught:
        build_lm(settings=_settings(server))("hello")
    assert len(server.requests) == 3  # first attempt + FLAGSHIP_LM_RETRIES=2
    assert caught.value.model == "openai/fake-model"


def test_unauthorized_is_an_auth_error_at_once(server: FakeOpenAI) -> None:
    server.always(401, message="invalid api key")
    lm = build_lm(settings=_settings(server))
    with pytest.raises(LMAuthError) as caught, dspy.context(lm=lm):
        dspy.Predict("ticket -> category")(ticket=TICKET)
    assert len(server.requests) == 1
    assert "invalid api key" in caught.value.message


@pytest.mark.parametrize("status", [400, 404])
def test_bad_request_is_returned_at_once(server: FakeOpenAI, status: int) -> None:
    server.always(status, message="unknown parameter")
    with pytest.raises(LMBadRequest):
        build_lm(settings=_settings(server))("hello")
    assert len(server.requests) == 1


def test_slow_response_times_out_and_counts_as_transient(server: FakeOpenAI) -> None:
    server.slow(1.0, times=2)
    lm = build_lm(settings=_settings(server, FLAGSHIP_LM_TIMEOUT_S="0.2", FLAGSHIP_LM_RETRIES="1"))
    with pytest.raises(LMUnavailable):
        lm("hello")
    assert len(server.requests) == 2


def test_async_calls_retry_too(server: FakeOpenAI) -> None:
    server.fail(429)
    lm = build_lm(settings=_settings(server))
    [text] = asyncio.run(lm.acall("hello"))
    assert text.startswith("[offline]") and len(server.requests) == 2


def test_local_server_without_a_key_never_receives_the_ambient_openai_key(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-secret")
    settings = LMSettings.from_env({"FLAGSHIP_LM": "m", "FLAGSHIP_LM_API_BASE": server.base_url})
    build_lm(settings=settings)("hello")
    assert server.requests[0].headers["authorization"] == f"Bearer {NO_KEY}"


def test_history_entries_from_the_real_lm_are_json_safe_with_usage(server: FakeOpenAI) -> None:
    lm = build_lm(settings=_settings(server))
    with dspy.context(lm=lm):
        dspy.Predict("ticket -> category, urgency, action")(ticket=TICKET)
    assert "response" in lm.history[-1]  # dspy's raw entry holds a non-JSON response object
    [entry] = history_entries(lm)
    assert json.loads(json.dumps(entry)) == entry
    assert entry["offline"] is False and entry["model"] == "openai/fake-model"
    usage = entry["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [m["role"] for m in entry["messages"]] == ["system", "user"]
    assert "outage" in entry["outputs"][0]


# -- error translation -----------------------------------------------------------------


class _StatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (dspy_errors.LMAuthError("bad key"), LMAuthError),
        (dspy_errors.LMNotConfiguredError("no key set"), LMAuthError),
        (dspy_errors.LMInvalidRequestError("bad"), LMBadRequest),
        (dspy_errors.LMUnsupportedModelError("no such model"), LMBadRequest),
        (dspy_errors.LMRateLimitError("slow down"), LMUnavailable),
        (dspy_errors.LMServerError("boom"), LMUnavailable),
        (dspy_errors.LMTransportError("reset"), LMUnavailable),
        (_StatusError(403), LMAuthError),
        (_StatusError(422), LMBadRequest),
        (_StatusError(502), LMUnavailable),
        (ConnectionRefusedError("refused"), LMUnavailable),
        (ValueError("not a provider error"), type(None)),
    ],
)
def test_translate_lm_error(exc: Exception, expected: type) -> None:
    typed = translate_lm_error("m", exc)
    assert type(typed) is expected
    if typed is not None:
        assert typed.model == "m" and typed.message


def test_context_window_errors_pass_through_the_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = ProviderLM("openai/x", retries=2, api_base="http://127.0.0.1:9/v1", api_key="k")
    exc = dspy_errors.ContextWindowExceededError(model="openai/x")
    calls: list[object] = []

    def too_long(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise exc

    monkeypatch.setattr(dspy.LM, "__call__", too_long)
    with pytest.raises(dspy_errors.ContextWindowExceededError):
        lm("hello")
    assert len(calls) == 1  # not retried
