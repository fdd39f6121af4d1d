"""Programs of every kind a user writes: two predictors, an agent with a package tool, one that raises."""

from __future__ import annotations

from typing import Any

import dspy


class TwoStep(dspy.Module):
    """``ticket -> category, urgency, action``: a classifier, then an action predictor fed by it."""

    def __init__(self, style: str = "plain") -> None:
        super().__init__()
        self.style = style
        self.classify = dspy.Predict("ticket -> category, urgency")
        self.act = dspy.Predict("ticket, category, urgency -> action")

    def forward(self, ticket: str) -> dspy.Prediction:
        if ticket == "boom":
            raise ValueError("cannot triage 'boom'")
        found = self.classify(ticket=ticket)
        step = self.act(ticket=ticket, category=found.category, urgency=found.urgency)
        return dspy.Prediction(category=found.category, urgency=found.urgency, action=step.action, style=self.style)


def lookup_order(order_id: str) -> str:
    """The status of an order, by id."""
    return {"A-17": "shipped, arriving Tuesday"}.get(order_id, "unknown order")


def order_agent() -> dspy.Module:
    """A ReAct agent over this package's tool (a factory: programs may be functions returning a module)."""
    return dspy.ReAct("question -> answer", tools=[lookup_order], max_iters=3)


class Explodes(dspy.Module):
    """Raises from ``forward`` when asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.echo = dspy.Predict("text -> reply")

    def forward(self, text: str) -> Any:
        if text == "boom":
            raise ValueError("the user's code failed on 'boom'")
        return self.echo(text=text)


def exact_category(example: Any, prediction: Any) -> bool:
    return bool(prediction.category == example.category)


NOT_A_PROGRAM = 42
from os import getcwd  # noqa: E402  (a name the module imports: never a program, never a tool)

__all__ = ["TwoStep", "order_agent", "Explodes", "exact_category", "lookup_order", "getcwd", "NOT_A_PROGRAM"]
