"""Metrics for ``client.evaluate`` (run on the workers, next to the program)."""

from __future__ import annotations

from typing import Any


def category_match(example: Any, prediction: Any) -> bool:
    """The predicted category equals the labelled one."""
    return bool(str(prediction.category).lower() == str(example.category).lower())


def triage_score(example: Any, prediction: Any) -> float:
    """Half a point each for the right category and the right urgency."""
    return 0.5 * (prediction.category == example.category) + 0.5 * (prediction.urgency == example.urgency)
