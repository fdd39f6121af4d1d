"""``dspy.Evaluate`` over the fleet: a devset scored by the user's metric next to the program, on every worker.

The devset's examples are ``dspy.Example``s made with ``with_inputs(...)`` (read
duck-typed: ``inputs()`` and ``toDict()``, so the producer still never imports
DSPy) or dicts with ``input_keys``. Each example travels whole (labels too) to a
worker, which runs the program on its inputs and the metric (a
``"package.module:function"`` path from the worker's program modules) on the
example and the program's own prediction. The score is ``dspy.Evaluate``'s: the
mean metric over the devset, as a percentage rounded to two decimals; a failed
example scores ``failure_score`` and keeps its typed error in place of a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from routing import validate
from routing.errors import FlagshipError, InvalidArgument
from routing.producer.fleet_map import Job, MapResult
from routing.producer.handles import ModuleRef
from routing.producer.prediction import Prediction

#: What a failed example scores (``dspy.Evaluate``'s default ``failure_score``).
failure_score = 0.0


@dataclass
class EvaluationResult:
    """``dspy.Evaluate``'s result: ``score`` (a percentage) and ``results`` of (example, prediction, score)."""

    score: float
    results: list[tuple[Any, Any, float]]
    #: How the run spread over the workers (examples per worker, failures by type, reruns, time).
    run: dict[str, Any] = field(default_factory=dict)
    #: What the run's LM calls used: calls, prompt_tokens, completion_tokens, cost_usd, cache_hits.
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[tuple[int, FlagshipError]]:
        """The failed examples: (index in the devset, typed error)."""
        return [(i, p) for i, (_, p, _) in enumerate(self.results) if isinstance(p, FlagshipError)]


def example_fields(example: Any, input_keys: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """An example's fields and its input keys (a ``dspy.Example``'s own, or ``input_keys`` for a dict)."""
    if isinstance(example, dict):
        if not input_keys:
            raise InvalidArgument("evaluate", "devset of dicts needs input_keys=[...] (or use dspy.Example"
                                              ".with_inputs(...))")
        return dict(example), list(input_keys)
    inputs, to_dict = getattr(example, "inputs", None), getattr(example, "toDict", None)
    if not callable(inputs) or not callable(to_dict):
        raise InvalidArgument("evaluate", f"each devset example must be a dspy.Example or a dict, "
                                          f"got {type(example).__name__}")
    try:
        keys = list(inputs().keys())
    except Exception as exc:  # dspy.Example.inputs() raises when with_inputs() was never called
        raise InvalidArgument("evaluate", f"a devset example has no inputs marked ({exc}); use "
                                          ".with_inputs(...)") from None
    return dict(to_dict()), keys


@dataclass(frozen=True)
class Plan:
    """A devset ready to map: one item per example, the job that scores it, and how to read the answers."""

    devset: list[Any]
    items: list[dict[str, Any]]
    job: Job

    def result(self, run: MapResult) -> EvaluationResult:
        results: list[tuple[Any, Any, float]] = []
        for example, output in zip(self.devset, run.outputs):
            if isinstance(output, FlagshipError):
                results.append((example, output, failure_score))
            else:
                outputs = output.get("outputs")
                results.append((example, None if outputs is None else Prediction(outputs), float(output["score"])))
        total = sum(score for *_, score in results)
        return EvaluationResult(round(100 * total / len(results), 2), results, run.summary(), dict(run.usage))


def plan(devset: Any, metric: Any, input_keys: Sequence[str] | None, return_outputs: Any) -> Plan:
    """The devset checked and turned into ``evaluate_example`` items (before any session opens)."""
    if isinstance(devset, (str, bytes, dict)) or not isinstance(devset, Sequence) or not devset:
        raise InvalidArgument("evaluate", "devset must be a non-empty list of examples")
    validate.program_path("evaluate", "metric", metric)
    keep_outputs = validate.flag(return_outputs, "evaluate", "return_outputs")
    examples = [example_fields(example, input_keys) for example in devset]
    items = [{"example": fields, "input_keys": keys} for fields, keys in examples]

    def item(module: ModuleRef, example: dict[str, Any]) -> dict[str, Any]:
        return {"ref": module.ref_id, **example, "metric": metric, "return_outputs": keep_outputs}

    return Plan(list(devset), items, Job("evaluate_example", item, lambda ok: ok))
