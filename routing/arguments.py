"""Argument rules of the allow-listed operations, checked by the producer before sending and by the worker.

:data:`ARGUMENTS` names, per operation, a rule for each argument that needs more
than the general bound (a number's range, a ref id's form, a text's size); an
argument not named there is bounded by ``max_context_bytes``. Same table on both
sides of the wire: ``Session.submit`` checks a call before it is sent, the worker's
allow-list (the authority) before it runs. The value checks are in :mod:`routing.validate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from routing.errors import InvalidArgument, InvalidSignature
from routing.validate import (
    INPUT_SETTING,
    UNMAPPABLE,
    SizeLimits,
    flag,
    input_fields,
    max_items,
    max_threads,
    number,
    operation_name,
    program_path,
    ref_id,
    show,
    sized,
)

#: A rule checks one named argument of an operation: (op, name, value, limits) -> None or a typed error.
Rule = Callable[[str, str, Any, SizeLimits], None]


def _number(low: float, high: float, integer: bool = False, optional: bool = True) -> Rule:
    return lambda op, name, value, _: number(op, name, value, low, high, integer=integer, optional=optional)


def _text(context: bool = False, optional: bool = True) -> Rule:
    def rule(op: str, name: str, value: Any, limits: SizeLimits) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise InvalidArgument(op, f"{name} must be a string, got {show(value)}")
        _any(context)(op, name, value, limits)
    return rule


def _any(context: bool = True) -> Rule:
    def rule(op: str, name: str, value: Any, limits: SizeLimits) -> None:
        if context:
            sized(op, name, value, limits.max_context_bytes, "FLAGSHIP_MAX_CONTEXT_BYTES")
        else:
            sized(op, name, value, limits.max_input_bytes, "FLAGSHIP_MAX_INPUT_BYTES")
    return rule


def _ref(optional: bool = True) -> Rule:
    def rule(op: str, name: str, value: Any, _: SizeLimits) -> None:
        if value is not None or not optional:
            ref_id(value, op, name)
    return rule


def _flag(op: str, name: str, value: Any, _: SizeLimits) -> None:
    flag(value, op, name)


def _signature(op: str, name: str, value: Any, limits: SizeLimits) -> None:
    if not isinstance(value, (str, dict)):
        raise InvalidSignature(show(value), "expected a signature string or a JSON field spec")
    _any(context=False)(op, name, value, limits)


def _program(optional: bool = True) -> Rule:
    def rule(op: str, name: str, value: Any, _: SizeLimits) -> None:
        if value is not None or not optional:
            program_path(op, name, value)
    return rule


def _names(op: str, name: str, value: Any, _: SizeLimits) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(op, f"{name} must be a non-empty list of field names")


def _object(op: str, name: str, value: Any, limits: SizeLimits) -> None:
    if value is not None and not isinstance(value, dict):
        raise InvalidArgument(op, f"{name} must be a JSON object, got {show(value)}")
    _any(context=True)(op, name, value, limits)


def _inputs(op: str, name: str, value: Any, limits: SizeLimits) -> None:
    input_fields(op, value, limits, name)


def _op_name(op: str, name: str, value: Any, _: SizeLimits) -> None:
    operation_name(value)
    if value in UNMAPPABLE:
        raise InvalidArgument(op, f"{name} must name an operation other than {sorted(UNMAPPABLE)}")


def _items(op: str, name: str, value: Any, _: SizeLimits) -> None:
    if not isinstance(value, list) or len(value) > max_items:
        raise InvalidArgument(op, f"{name} must be a list of at most {max_items} argument objects")


_MODULE: dict[str, Rule] = {"signature": _signature, "lm": _ref(), "instructions": _text(), "ref_id": _ref()}
#: Argument rules of the allow-listed operations; an argument not named here is bounded by ``max_context_bytes``.
ARGUMENTS: dict[str, dict[str, Rule]] = {
    "ping": {"sleep_s": _number(0, 60, optional=False)},
    "lm": {"model": _text(), "temperature": _number(0.0, 2.0), "max_tokens": _number(1, 1_000_000, integer=True),
           "api_base": _text(), "api_key": _text(), "default": _flag, "ref_id": _ref()},
    "set_default_lm": {"lm": _ref(optional=False)},
    "predict": _MODULE,
    "chain_of_thought": _MODULE,
    "rlm": {**_MODULE, "sub_lm": _ref(), "max_iters": _number(1, 50, integer=True, optional=False),
            "max_llm_calls": _number(1, 500, integer=True, optional=False),
            "max_output_chars": _number(100, 1_000_000, integer=True, optional=False)},
    "call": {"ref": _ref(optional=False), "inputs": _inputs, "program": _program(), "stream": _object},
    "program": {"path": _program(optional=False), "init": _object, "state": _object, "lm": _ref(), "ref_id": _ref()},
    "dump_state": {"ref": _ref(optional=False)},
    "evaluate_example": {"ref": _ref(optional=False), "example": _object, "input_keys": _names,
              "metric": _program(optional=False), "return_outputs": _flag},
    "context": {"text": _text(context=True), "ref_id": _ref()},
    "release_ref": {"ref": _ref(optional=False)},
    "history": {"lm": _ref(), "n": _number(0, 10_000, integer=True, optional=False)},
    "map": {"op": _op_name, "items": _items, "num_threads": _number(1, max_threads, integer=True, optional=False)},
    "payload_size": {"digest": _flag},
}
_DEFAULT_RULE = _any(context=True)
_JSON_TYPES = (str, int, float, list, tuple, dict)


def call_arguments(op: Any, kwargs: Any, limits: SizeLimits, *, items: bool = True) -> None:
    """Check one call's operation name and arguments against :data:`ARGUMENTS` and the size limits.

    A value of a type JSON has no name for (a set, a datetime) is left to the message
    encoder, which refuses or converts it as it always does. ``items``: also check the
    size of each item of a ``map`` (the producer does, so an oversized item is never
    sent); anything else about an item is its own typed error, in its place, when it runs.
    """
    op = operation_name(op)
    if not isinstance(kwargs, dict) or not all(isinstance(name, str) for name in kwargs):
        raise InvalidArgument(op, "arguments must be a JSON object of keyword arguments")
    rules = ARGUMENTS.get(op, {})
    for name, value in kwargs.items():
        if value is None or isinstance(value, _JSON_TYPES):
            rules.get(name, _DEFAULT_RULE)(op, name, value, limits)
    if op == "map" and items:
        for item in kwargs.get("items") or []:
            item_sizes(kwargs.get("op"), item, limits)


def item_sizes(op: Any, item: Any, limits: SizeLimits) -> None:
    """The size limits alone, for one item of a ``map`` (module inputs per field, other arguments whole)."""
    if not isinstance(item, dict):
        return
    for name, value in item.items():
        if op == "call" and name == "inputs" and isinstance(value, dict):
            for field, text in value.items():
                sized(str(op), f"input {field!r}", text, limits.max_input_bytes, INPUT_SETTING)
        else:
            _DEFAULT_RULE(str(op), str(name), value, limits)
