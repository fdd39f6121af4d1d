"""Numpy analytics served by the hint pool: typed input errors, numbers equal to numpy's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from routing import Session
from routing.errors import InvalidAnalyticsInput

GOLD = [{"category": "outage", "urgency": "high"}, {"category": "billing", "urgency": "medium"},
        {"category": "bug", "urgency": "medium"}]
PREDICTED = [{"category": " Outage", "urgency": "HIGH", "latency_s": 0.2},
             {"category": "billing", "urgency": "low", "latency_s": 0.4},
             {"category": "feature", "urgency": "low", "latency_s": 0.3}]


def test_scores_computed_on_the_analytics_pool_equal_numpy(sessions: Callable[..., Session]) -> None:
    result = sessions("analytics_pool").call("score", predictions=PREDICTED, gold=GOLD, timeout_s=10)
    assert result["scores"] == [1.0, 0.5, 0.0]
    assert result["mean"] == pytest.approx(np.mean([1.0, 0.5, 0.0]))
    assert result["std"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    assert result["p80"] == pytest.approx(np.percentile([1.0, 0.5, 0.0], 80))
    assert result["latency"]["p50_s"] == pytest.approx(np.percentile([0.2, 0.4, 0.3], 50))


@pytest.mark.parametrize("predictions, gold, field", [
    ([], [], "predictions"),
    (PREDICTED[:2], GOLD, "predictions"),
    ([{"category": "outage"}], GOLD[:1], "predictions[0].urgency"),
    ("outage", GOLD, "predictions"),
])
def test_bad_analytics_input_is_typed_and_the_worker_keeps_serving(
    sessions: Callable[..., Session], predictions: object, gold: object, field: str
) -> None:
    session = sessions("analytics_pool")
    with pytest.raises(InvalidAnalyticsInput) as raised:
        session.call("score", predictions=predictions, gold=gold, timeout_s=10)
    assert raised.value.field.startswith(field.split("[")[0])
    assert session.call("score", predictions=PREDICTED, gold=GOLD, timeout_s=10)["mean"] == pytest.approx(0.5)
