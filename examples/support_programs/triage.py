"""Support-ticket triage as a two-step DSPy program: classify, then choose the next action."""

from __future__ import annotations

from typing import Literal

import dspy

Category = Literal["outage", "account", "billing", "bug", "feature", "other"]
Urgency = Literal["low", "medium", "high", "critical"]


class Classify(dspy.Signature):
    """Classify a customer support ticket."""

    ticket: str = dspy.InputField()
    category: Category = dspy.OutputField()
    urgency: Urgency = dspy.OutputField()


class NextAction(dspy.Signature):
    """Choose the next action for a classified support ticket."""

    ticket: str = dspy.InputField()
    category: str = dspy.InputField()
    urgency: str = dspy.InputField()
    action: str = dspy.OutputField(desc="one sentence")


class SupportTriage(dspy.Module):
    """``ticket -> category, urgency, action`` in two predictors (each tunable by an optimizer)."""

    def __init__(self, reasoning: bool = False) -> None:
        super().__init__()
        self.classify = dspy.ChainOfThought(Classify) if reasoning else dspy.Predict(Classify)
        self.act = dspy.Predict(NextAction)

    def forward(self, ticket: str) -> dspy.Prediction:
        found = self.classify(ticket=ticket)
        step = self.act(ticket=ticket, category=found.category, urgency=found.urgency)
        return dspy.Prediction(category=found.category, urgency=found.urgency, action=step.action)
