"""Score triage predictions against gold labels with numpy; pure functions, JSON-safe results.

Results cross Celery as JSON, so every number is a plain Python ``float``/``int``
(never a numpy scalar) and every input problem is an ``InvalidAnalyticsInput``
naming the field, rather than a numpy error deep in a worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from routing.errors import InvalidAnalyticsInput

__all__ = ["score_predictions", "LABEL_FIELDS"]

#: Fields compared between a prediction and its gold label; each is worth half a point.
LABEL_FIELDS = ("category", "urgency")
#: Percentile reported next to mean and std.
SCORE_PERCENTILE = 80


def _norm(value: str) -> str:
    return value.strip().lower()


def _check_items(name: str, items: Any) -> list[Mapping[str, Any]]:
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise InvalidAnalyticsInput(name, f"must be a list of objects, got {type(items).__name__}")
    if not items:
        raise InvalidAnalyticsInput(name, "must not be empty")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidAnalyticsInput(f"{name}[{i}]", f"must be an object, got {type(item).__name__}")
        for field in LABEL_FIELDS:
            if field not in item:
                raise InvalidAnalyticsInput(f"{name}[{i}].{field}", "is missing")
            if not isinstance(item[field], str):
                kind = type(item[field]).__name__
                raise InvalidAnalyticsInput(f"{name}[{i}].{field}", f"must be a string, got {kind}")
        ticket_id = item.get("ticket_id")
        if isinstance(ticket_id, bool) or (ticket_id is not None and not isinstance(ticket_id, (str, int))):
            raise InvalidAnalyticsInput(f"{name}[{i}].ticket_id", "must be a string or an integer")
    return list(items)


def _latencies(predictions: list[Mapping[str, Any]]) -> list[float]:
    """The latencies the predictions carry (a prediction without ``latency_s`` is skipped)."""
    values = []
    for i, p in enumerate(predictions):
        value = p.get("latency_s")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidAnalyticsInput(f"predictions[{i}].latency_s", f"must be a finite number >= 0, got {value!r}")
        values.append(float(value))
    return values


def _confusion(gold: list[str], predicted: list[str]) -> dict[str, Any]:
    """Category confusion matrix: rows are gold labels, columns predicted, labels sorted."""
    labels = sorted(set(gold) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([index[g] for g in gold], [index[p] for p in predicted]), 1)
    return {"labels": labels, "matrix": matrix.tolist()}


def score_predictions(predictions: list[dict[str, Any]], gold: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-ticket scores (0.5 per matching field), their mean/std/80th percentile, and diagnostics."""
    predictions = _check_items("predictions", predictions)
    gold = _check_items("gold", gold)
    if len(predictions) != len(gold):
        raise InvalidAnalyticsInput("predictions", f"has {len(predictions)} items but gold has {len(gold)}")
    for i, (p, g) in enumerate(zip(predictions, gold, strict=True)):
        if p.get("ticket_id") is not None and g.get("ticket_id") is not None and p["ticket_id"] != g["ticket_id"]:
            raise InvalidAnalyticsInput(f"predictions[{i}].ticket_id",
                                        f"{p['ticket_id']!r} does not match gold {g['ticket_id']!r}")
    latencies = _latencies(predictions)

    pairs = list(zip(predictions, gold, strict=True))
    matches = np.array([[_norm(p[f]) == _norm(g[f]) for f in LABEL_FIELDS] for p, g in pairs])
    scores = matches.astype(np.float64) @ np.full(len(LABEL_FIELDS), 1.0 / len(LABEL_FIELDS))
    per_ticket = [
        {"ticket_id": p.get("ticket_id", g.get("ticket_id", i)), "score": float(s),
         **{f"{f}_match": bool(m) for f, m in zip(LABEL_FIELDS, row, strict=True)}}
        for i, (p, g, s, row) in enumerate(zip(predictions, gold, scores, matches, strict=True))
    ]
    result: dict[str, Any] = {
        "n": len(scores),
        "scores": [float(s) for s in scores],
        "per_ticket": per_ticket,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "p80": float(np.percentile(scores, SCORE_PERCENTILE)),
        "accuracy": {f: float(np.mean(matches[:, j])) for j, f in enumerate(LABEL_FIELDS)},
        "confusion": _confusion([_norm(g["category"]) for g in gold], [_norm(p["category"]) for p in predictions]),
        "numpy_version": np.__version__,
        "latency": None,
    }
    if latencies:
        values = np.array(latencies)
        result["latency"] = {
            "n": len(latencies),
            "p50_s": float(np.percentile(values, 50)),
            "p95_s": float(np.percentile(values, 95)),
            "mean_s": float(np.mean(values)),
            "max_s": float(np.max(values)),
        }
    return result
