"""score_predictions: numbers checked against direct numpy computation, and each validation error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routing.errors import InvalidAnalyticsInput
from tasks.ops.scoring import score_predictions

GOLD = [
    {"ticket_id": "t1", "category": "outage", "urgency": "high"},
    {"ticket_id": "t2", "category": "billing", "urgency": "medium"},
    {"ticket_id": "t3", "category": "feature", "urgency": "low"},
    {"ticket_id": "t4", "category": "account", "urgency": "high"},
    {"ticket_id": "t5", "category": "bug", "urgency": "medium"},
]
PREDICTIONS = [
    {"ticket_id": "t1", "category": " Outage", "urgency": "HIGH ", "latency_s": 0.8},  # trimmed, case-insensitive
    {"ticket_id": "t2", "category": "billing", "urgency": "low", "latency_s": 1.1},
    {"ticket_id": "t3", "category": "bug", "urgency": "low", "latency_s": 0.4},
    {"ticket_id": "t4", "category": "bug", "urgency": "medium", "latency_s": 2.5},
    {"ticket_id": "t5", "category": "bug", "urgency": "medium", "latency_s": 0.9},
]
EXPECTED_SCORES = [1.0, 0.5, 0.5, 0.0, 1.0]


def test_scores_mean_std_and_percentile_match_numpy() -> None:
    result = score_predictions(PREDICTIONS, GOLD)
    expected = np.array(EXPECTED_SCORES)
    assert result["scores"] == EXPECTED_SCORES
    assert result["n"] == 5
    assert result["mean"] == pytest.approx(float(np.mean(expected)))
    assert result["std"] == pytest.approx(float(np.std(expected)))
    assert result["p80"] == pytest.approx(float(np.percentile(expected, 80)))
    assert result["numpy_version"] == np.__version__
    assert [t["ticket_id"] for t in result["per_ticket"]] == ["t1", "t2", "t3", "t4", "t5"]
    assert result["per_ticket"][1] == {"ticket_id": "t2", "score": 0.5, "category_match": True, "urgency_match": False}


def test_per_field_accuracy_and_confusion_matrix() -> None:
    result = score_predictions(PREDICTIONS, GOLD)
    assert result["accuracy"] == {"category": pytest.approx(3 / 5), "urgency": pytest.approx(3 / 5)}
    labels = ["account", "billing", "bug", "feature", "outage"]
    assert result["confusion"]["labels"] == labels
    expected = np.zeros((5, 5), dtype=int)
    for gold, pred in [("outage", "outage"), ("billing", "billing"), ("feature", "bug"), ("account", "bug"),
                       ("bug", "bug")]:
        expected[labels.index(gold), labels.index(pred)] += 1
    assert result["confusion"]["matrix"] == expected.tolist()


def test_latency_percentiles_when_given() -> None:
    result = score_predictions(PREDICTIONS, GOLD)
    latencies = np.array([p["latency_s"] for p in PREDICTIONS])
    assert result["latency"]["p50_s"] == pytest.approx(float(np.percentile(latencies, 50)))
    assert result["latency"]["p95_s"] == pytest.approx(float(np.percentile(latencies, 95)))
    without = [{k: v for k, v in p.items() if k != "latency_s"} for p in PREDICTIONS]
    assert score_predictions(without, GOLD)["latency"] is None


def test_result_is_plain_json() -> None:
    result = score_predictions(PREDICTIONS, GOLD)
    assert json.loads(json.dumps(result)) == result
    for value in (result["mean"], result["std"], result["p80"], *result["scores"]):
        assert type(value) is float
    assert all(type(cell) is int for row in result["confusion"]["matrix"] for cell in row)


def test_single_ticket_has_zero_std() -> None:
    result = score_predictions(PREDICTIONS[:1], GOLD[:1])
    assert (result["mean"], result["std"], result["p80"]) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("predictions", "gold", "field"),
    [
        ("not a list", GOLD, "predictions"),
        (PREDICTIONS, {"category": "bug"}, "gold"),
        ([], [], "predictions"),
        (PREDICTIONS[:4], GOLD, "predictions"),
        ([*PREDICTIONS[:4], "bug"], GOLD, "predictions[4]"),
        ([{"urgency": "high"}], GOLD[:1], "predictions[0].category"),
        (PREDICTIONS[:1], [{"category": "outage", "urgency": 3}], "gold[0].urgency"),
        ([{**PREDICTIONS[0], "latency_s": "fast"}], GOLD[:1], "predictions[0].latency_s"),
        ([{**PREDICTIONS[0], "latency_s": float("nan")}], GOLD[:1], "predictions[0].latency_s"),
        ([{**PREDICTIONS[0], "latency_s": True}], GOLD[:1], "predictions[0].latency_s"),
        ([{**PREDICTIONS[0], "ticket_id": "t9"}], GOLD[:1], "predictions[0].ticket_id"),
        ([{**PREDICTIONS[0], "ticket_id": 1.5}], GOLD[:1], "predictions[0].ticket_id"),
    ],
)
def test_invalid_input_names_the_field(predictions: object, gold: object, field: str) -> None:
    with pytest.raises(InvalidAnalyticsInput) as caught:
        score_predictions(predictions, gold)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert caught.value.reason
