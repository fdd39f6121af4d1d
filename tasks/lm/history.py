"""An LM's call history as JSON-safe dicts, with long texts clipped."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import dspy

__all__ = ["HISTORY_CHARS", "clip", "history_entries"]

#: Characters of each message kept by ``history_entries`` unless told otherwise.
HISTORY_CHARS = 400


def clip(text: Any, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more chars]"


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # multimodal parts: keep the text, name the rest
        return "\n".join(str(p.get("text", f"<{p.get('type', 'part')}>")) if isinstance(p, dict) else str(p)
                         for p in content)
    return "" if content is None else str(content)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _entry(entry: Mapping[str, Any], index: int, limit: int) -> dict[str, Any]:
    usage = entry.get("usage") or {}
    cost = entry.get("cost")
    messages = entry.get("messages")
    outputs = entry.get("outputs") or []
    timestamp = entry.get("timestamp")
    return {
        "index": index,
        "model": str(entry.get("model") or ""),
        "response_model": None if entry.get("response_model") is None else str(entry["response_model"]),
        "timestamp": timestamp.isoformat() if hasattr(timestamp, "isoformat") else str(timestamp or ""),
        "offline": bool(entry.get("offline")) or str(entry.get("model") or "").startswith("offline/"),
        "messages": None if not messages else [
            {"role": str(m.get("role", "")), "content": clip(_content_text(m.get("content")), limit)}
            for m in messages if isinstance(m, Mapping)],
        "prompt_preview": None if entry.get("prompt") is None else clip(entry["prompt"], limit),
        "outputs": [clip(o.get("text") if isinstance(o, Mapping) else o, limit) for o in outputs],
        "usage": {key: _int_or_none(usage.get(key)) for key in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "cost": float(cost) if isinstance(cost, (int, float)) and math.isfinite(cost) else None,
        "cache_hit": (entry.get("cost_details") or {}).get("kind") == "cache_hit",
    }


def history_entries(lm: dspy.BaseLM, n: int = 6, since_index: int | None = None,
                    max_chars: int | None = None) -> list[dict[str, Any]]:
    """The last ``n`` history entries of ``lm`` (from ``since_index`` on, if given) as JSON-safe dicts.

    ``index`` is the entry's position in ``lm.history``, so a caller can ask for what is new since.
    """
    limit = HISTORY_CHARS if max_chars is None else max_chars
    history = list(getattr(lm, "history", None) or [])
    start = 0 if since_index is None else max(0, since_index)
    first = max(start, len(history) - max(n, 0))
    return [_entry(entry, index, limit) for index, entry in enumerate(history[first:], first)]
