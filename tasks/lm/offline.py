"""A deterministic, clearly labelled stand-in LM for when no provider is configured.

The flagship run must work end to end without a model API, but its output must
never pass for a model's answer: every free-text field starts with ``[offline]``
and every history entry carries ``offline: True``. It answers in DSPy's own
formats (ChatAdapter sections or JSONAdapter objects) so ``dspy.Predict``,
``dspy.ChainOfThought`` and ``dspy.RLM`` parse it like a real model's reply.

It plugs into DSPy 3.4 as a custom engine (``complete(Request) -> Response``),
so DSPy's own execution path records history and usage exactly as for
``dspy.LM``; the legacy ``forward()`` interface is deprecated.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import replace
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

from routing.settings import env_number
from tasks.lm.offline_format import LABEL, OFFLINE_MODEL, field_types, fit, is_text, render_chat, sections
from tasks.lm.offline_rules import (
    rlm_action,
    rlm_analysis_code,
    rlm_extract,
    submit_fields,
    triage_ticket,
    triage_values,
)

__all__ = ["OFFLINE_MODEL", "LABEL", "OfflineLM", "reply_for", "triage_ticket", "rlm_analysis_code"]


def _values(fields: dict[str, str], inputs: dict[str, str], system: str) -> dict[str, Any]:
    """Choose a value for every output field: RLM script, triage rules, else placeholders."""
    if "repl_history" in inputs and "code" in fields:
        outputs = submit_fields(system)
        found = rlm_action(inputs, outputs)
    elif "repl_history" in inputs:
        found = rlm_extract(inputs)
    elif {"category", "urgency", "action"} & set(fields) or "ticket" in inputs:
        text = inputs.get("ticket") or "\n".join(inputs.values())
        found = triage_values(text)
    else:
        found = {}
    values = {}
    for name, type_text in fields.items():
        value = found.get(name)
        if value is None and is_text(type_text):
            value = found.get("answer")  # RLM extract: the answer fills the text outputs
        values[name] = fit(name, value, type_text)
    return values


def reply_for(messages: list[dict[str, Any]]) -> str:
    """The scripted reply to an OpenAI-style message list (also served by the test HTTP server)."""
    system = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    last = users[-1] if users else ""
    fields = field_types(system)
    if not fields:  # a bare prompt, e.g. RLM's llm_query sub-call
        preview = " ".join(last.split())[:80]
        return f"{LABEL} scripted reply, not a model answer (no LM provider configured). Prompt began: {preview!r}"
    values = _values(fields, sections(last), system)
    if "Outputs will be a JSON object" in system:
        return json.dumps(values, indent=2)
    return render_chat(values)


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class _ScriptedEngine:
    """DSPy engine contract: one canonical request in, one response out, no I/O."""

    def __init__(self, chunk_delay_s: float = 0.0) -> None:
        #: A pause before each streamed piece (``FLAGSHIP_OFFLINE_CHUNK_DELAY_S``): a demo page shows text growing.
        self.chunk_delay_s = chunk_delay_s

    def complete(self, request: Any) -> Response:
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        text = reply_for(messages)
        prompt_tokens = sum(_tokens(str(m["content"])) for m in messages)
        usage = Usage(input_tokens=prompt_tokens, output_tokens=_tokens(text),
                      total_tokens=prompt_tokens + _tokens(text))
        return Response(id=None, model=OFFLINE_MODEL, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=usage)

    def stream(self, request: Any) -> Any:
        """The reply a word at a time (whitespace kept), so ``dspy.streamify`` streams it in pieces."""
        from dspy.lm15 import response_to_events

        for event in response_to_events(self.complete(request)):
            delta = getattr(event, "delta", None)
            if getattr(delta, "type", None) != "text" or delta.logprobs:
                yield event
                continue
            for piece in re.findall(r"\S+\s*|\s+", delta.text) or [delta.text]:
                if self.chunk_delay_s:
                    time.sleep(self.chunk_delay_s)
                yield replace(event, delta=replace(delta, text=piece))

    def close(self) -> None:
        """Nothing to release."""


class _AsyncScriptedEngine:
    def __init__(self, sync: _ScriptedEngine) -> None:
        self.sync = sync

    async def complete(self, request: Any) -> Response:
        return self.sync.complete(request)

    async def stream(self, request: Any) -> Any:
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""


class OfflineLM(dspy.BaseLM):
    """Scripted LM used when no provider is configured; never cached, never billed."""

    def __init__(self, model: str = OFFLINE_MODEL, temperature: float | None = 0.0,
                 max_tokens: int | None = 4000, **kwargs: Any) -> None:
        for fixed in ("model_type", "cache", "num_retries"):  # present in dump_state(); always chat, uncached
            kwargs.pop(fixed, None)
        super().__init__(model, "chat", temperature, max_tokens, cache=False, num_retries=0, **kwargs)
        self._engine_spec = _ScriptedEngine(env_number(os.environ, "FLAGSHIP_OFFLINE_CHUNK_DELAY_S", 0.0, float))
        self._async_engine_spec = _AsyncScriptedEngine(self._engine_spec)

    def update_history(self, entry: dict[str, Any]) -> None:
        # Label the entry before DSPy stores it in the LM, global and module histories.
        entry["offline"] = True
        entry["cost"] = 0.0
        entry["cost_details"] = {"kind": "offline", "reason": "scripted offline LM, no provider was called"}
        super().update_history(entry)
