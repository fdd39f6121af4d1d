"""Building DSPy signatures from producer input, without evaluating any of it.

Two forms are accepted:

* a string, ``"ticket -> category, urgency, action"``, each field optionally typed
  with one of :data:`ALLOWED_TYPES` (``"text: str -> score: float"``);
* a JSON spec, ``{"inputs": {"ticket": {"desc": "..."}}, "outputs": {"urgency":
  {"type": "literal", "choices": ["high", "medium", "low"]}}, "instructions": "..."}``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import dspy

from routing.errors import InvalidSignature

#: Field types a producer may name; nothing else is resolved.
ALLOWED_TYPES: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool,
    "list[str]": list[str], "list[int]": list[int], "list[float]": list[float],
    "dict[str, str]": dict[str, str], "dict[str, float]": dict[str, float],
}
_FIELD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(.+?))?\s*$")
#: Keep signatures to a sane size (they end up in every prompt).
max_fields = 32
max_signature_chars = 4000


def _field_type(signature: object, name: str, spec: str | None) -> Any:
    if spec is None:
        return str
    spec = re.sub(r"\s+", " ", spec.strip())
    if spec in ALLOWED_TYPES:
        return ALLOWED_TYPES[spec]
    raise InvalidSignature(signature, f"field {name!r} has type {spec!r}; allowed: {sorted(ALLOWED_TYPES)}")


def _split_fields(signature: str, side: str) -> list[tuple[str, str | None]]:
    fields = []
    depth, current = 0, ""
    for ch in side:  # split on commas outside brackets (dict[str, str])
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            fields.append(current)
            current = ""
        else:
            current += ch
    fields.append(current)
    parsed = []
    for raw in fields:
        match = _FIELD.match(raw)
        if not match:
            raise InvalidSignature(signature, f"cannot read field {raw.strip()!r}")
        parsed.append((match.group(1), match.group(2)))
    return parsed


def _from_string(signature: str, instructions: str | None) -> type[dspy.Signature]:
    if signature.count("->") != 1:
        raise InvalidSignature(signature, "expected exactly one '->' between inputs and outputs")
    inputs, outputs = signature.split("->")
    fields: dict[str, tuple[Any, Any]] = {}
    for side, make in ((inputs, dspy.InputField), (outputs, dspy.OutputField)):
        for name, spec in _split_fields(signature, side):
            if name in fields:
                raise InvalidSignature(signature, f"field {name!r} appears twice")
            fields[name] = (_field_type(signature, name, spec), make())
    return _make(signature, fields, instructions)


def _spec_type(signature: object, name: str, spec: dict[str, Any]) -> Any:
    kind = spec.get("type", "str")
    if kind == "literal":
        choices = spec.get("choices")
        if not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidSignature(signature, f"field {name!r}: literal needs a list of string choices")
        return Literal[tuple(choices)]
    return _field_type(signature, name, kind)


def _from_spec(spec: dict[str, Any]) -> type[dspy.Signature]:
    fields: dict[str, tuple[Any, Any]] = {}
    for side, make in (("inputs", dspy.InputField), ("outputs", dspy.OutputField)):
        group = spec.get(side)
        if not isinstance(group, dict) or not group:
            raise InvalidSignature(spec, f"{side!r} must be a non-empty object of fields")
        for name, field in group.items():
            field = field or {}
            if not isinstance(field, dict) or not _FIELD.match(name) or ":" in name or name in fields:
                raise InvalidSignature(spec, f"bad field {name!r}")
            desc = field.get("desc")
            fields[name] = (_spec_type(spec, name, field), make(desc=desc) if desc else make())
    return _make(spec, fields, spec.get("instructions"))


def _make(signature: object, fields: dict[str, tuple[Any, Any]], instructions: str | None) -> type[dspy.Signature]:
    if len(fields) > max_fields:
        raise InvalidSignature(signature, f"more than {max_fields} fields")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidSignature(signature, "instructions must be a string")
    try:
        return dspy.make_signature(fields, instructions)
    except (ValueError, TypeError) as exc:
        raise InvalidSignature(signature, str(exc)) from None


def build_signature(signature: str | dict[str, Any], instructions: str | None = None) -> type[dspy.Signature]:
    if isinstance(signature, str):
        if len(signature) > max_signature_chars:
            raise InvalidSignature(signature[:80] + "...", f"longer than {max_signature_chars} characters")
        return _from_string(signature, instructions)
    if isinstance(signature, dict):
        return _from_spec({**signature, **({"instructions": instructions} if instructions else {})})
    raise InvalidSignature(repr(signature)[:80], "expected a signature string or a JSON field spec")
