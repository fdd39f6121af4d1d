"""One example of a fleet evaluation: run the program, score it with the user's metric, next to each other.

``client.evaluate`` maps ``evaluate_example`` over a devset: each item names the program ref,
the example (every field, labels included), which of its fields are inputs, and
the metric (a ``"package.module:function"`` path from the worker's program
modules). The metric gets what ``dspy.Evaluate`` gives it: a ``dspy.Example`` with
those inputs marked, and the program's own ``Prediction`` object.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import dspy

from routing.errors import FlagshipError, InvalidArgument, ProgramError
from tasks.ops.modules import store
from tasks.ops.programs import catalog, outputs_of, run_program, user_error
from tasks.worker.allowlist import CallContext, operation


def _example(example: Any, input_keys: list[str]) -> tuple[dspy.Example, dict[str, Any]]:
    if not isinstance(example, dict):
        raise InvalidArgument("evaluate_example", "example must be a JSON object of its fields")
    missing = [key for key in input_keys if key not in example]
    if missing:
        raise InvalidArgument("evaluate_example", f"example lacks its input field(s) {missing}")
    return dspy.Example(**example).with_inputs(*input_keys), {key: example[key] for key in input_keys}


def as_score(metric: str, value: Any) -> float:
    """A metric's result as a number (bools count 1 and 0, as ``dspy.Evaluate`` sums them)."""
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise ProgramError(metric, "TypeError", f"the metric returned {type(value).__name__}, not a number", "")


@operation("evaluate_example")
def evaluate_example(ctx: CallContext, ref: str, example: dict[str, Any], input_keys: list[str], metric: str,
                     return_outputs: bool = True) -> dict[str, Any]:
    """``metric(example, program(**inputs))`` for one example; its outputs too unless ``return_outputs`` is False.

    ``input_keys`` was checked by the allow-list (``routing.arguments``: a non-empty list of names).
    """
    entry = store(ctx).get(ctx.session_id, ref, kind="program")
    metric_fn = catalog(ctx).function(metric)
    gold, inputs = _example(example, input_keys)
    prediction, _ = run_program(ctx, entry, inputs)
    try:
        value = metric_fn(gold, prediction)
    except FlagshipError:
        raise
    except Exception as exc:
        raise user_error(metric, exc) from None
    return {"score": as_score(metric, value), "outputs": outputs_of(prediction) if return_outputs else None}
