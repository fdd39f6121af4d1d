"""Stateless numpy analytics, served by the hint-affinity analytics pool."""

from __future__ import annotations

from typing import Any

from tasks.ops.scoring import score_predictions
from tasks.worker.allowlist import CallContext, operation


@operation("score")
def score(ctx: CallContext, predictions: list[dict[str, Any]], gold: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-ticket scores, mean, std, p80, confusion matrix, per-field accuracy, latency percentiles."""
    return {**score_predictions(predictions, gold), "worker": ctx.node}
