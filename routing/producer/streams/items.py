"""What a streamed call yields before its ``Prediction``, decoded from its Redis stream's entries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["END", "StreamChunk", "StreamStatus", "decode"]

#: The worker's last entry: the module returned; its ``Prediction`` is the call's result.
END = "end"


@dataclass(frozen=True)
class StreamChunk:
    """A piece of an output field as the LM wrote it (DSPy's ``StreamResponse``), tagged with its call."""

    field: str
    text: str
    #: The predictor that wrote it (``"self"`` for a plain Predict; ``"predict"`` inside ChainOfThought).
    predictor: str | None
    call_id: str


@dataclass(frozen=True)
class StreamStatus:
    """One of DSPy's status messages (``StatusMessage``): a module, tool or LM call starting or ending."""

    message: str
    call_id: str


def decode(call_id: str, fields: Any) -> StreamChunk | StreamStatus | str:
    """A stream entry (``{"e": json}``) as its item, or :data:`END`; anything unreadable as a status saying so."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    raw = fields.get(b"e", fields.get("e")) if isinstance(fields, dict) else None
    try:
        entry = json.loads(raw)  # type: ignore[arg-type]  # None: a TypeError, as for any unreadable entry
        kind = entry["t"]
        if kind == "chunk":
            return StreamChunk(str(entry["field"]), str(entry["text"]), entry.get("predictor"), call_id)
        if kind == "status":
            return StreamStatus(str(entry["message"]), call_id)
        if kind == END:
            return END
    except (TypeError, ValueError, KeyError):
        pass
    return StreamStatus(f"unreadable stream entry: {raw!r:.200}", call_id)
