"""What DSPy users read back: module outputs (``pred.category`` as well as ``pred["category"]``) and LM history."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO


class Prediction(dict[str, Any]):
    """A module call's output fields (``reasoning`` included where the module has it).

    A plain ``dict`` underneath, so it is JSON-serialisable and compares equal to
    one; attribute access mirrors ``dspy.Prediction`` without importing DSPy.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"prediction has no field {name!r}; fields: {sorted(self)}") from None

    def __repr__(self) -> str:
        return "Prediction(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"



class History(list[dict[str, Any]]):
    """A session's last LM calls, oldest first: a list of JSON-safe entries, as ``session.history(n=6)`` returns.

    Each entry is a dict: ``model``, ``messages`` (role and content, long texts clipped), ``outputs``,
    ``usage`` (prompt, completion and total tokens), ``cost``, ``timestamp``, ``offline``, ``lm_ref``.
    ``worker`` is the node that read them; ``complete`` is False once the session was rebuilt on
    another worker (the history the dead worker held is gone), and ``note`` then says so.
    """

    def __init__(self, entries: Iterable[dict[str, Any]] = (), *, worker: str | None = None,
                 complete: bool = True, note: str | None = None) -> None:
        super().__init__(entries)
        self.worker = worker
        self.complete = complete
        self.note = note

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> History:
        """The ``history`` operation's JSON reply (``{"entries", "worker", "complete", "note"}``) as a History."""
        return cls(reply["entries"], worker=reply.get("worker"), complete=bool(reply.get("complete", True)),
                   note=reply.get("note"))

    def __repr__(self) -> str:
        return f"History({list.__repr__(self)}, worker={self.worker!r}, complete={self.complete!r})"

    def inspect(self, n: int | None = None, file: TextIO | None = None) -> None:
        """Print the last ``n`` entries (all by default) the way ``dspy.inspect_history`` does: messages, then
        the response, with model, tokens and cost."""
        out = file or sys.stdout
        if self.note:
            print(f"({self.note})", file=out)
        for entry in self[-n:] if n else self:
            usage = entry.get("usage") or {}
            print(f"[{entry.get('timestamp')}] {entry.get('model')}  tokens {usage.get('total_tokens')}  "
                  f"cost {entry.get('cost')}", file=out)
            for message in entry.get("messages") or []:
                print(f"{message.get('role', '').capitalize()} message:\n{message.get('content')}\n", file=out)
            for output in entry.get("outputs") or []:
                print(f"Response:\n{output}\n", file=out)
