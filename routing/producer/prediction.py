"""Module outputs the way DSPy users read them: ``pred.category`` as well as ``pred["category"]``."""

from __future__ import annotations

from typing import Any


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

