"""DSPy's prompt and reply formats, as the offline LM reads and writes them.

Reads the adapter's system message (output fields and their types) and the user
message's ``[[ ## field ## ]]`` sections; writes ChatAdapter replies. Tied to DSPy
3.4.1's wording: check it when upgrading DSPy.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Model name recorded in history for the scripted LM.
OFFLINE_MODEL = "offline/scripted"
#: Prefix of every free-text value the scripted LM produces.
LABEL = "[offline]"

_SECTION = re.compile(r"^\[\[ ## (\w+) ## \]\]", re.MULTILINE)
_OUTPUT_LIST = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", re.DOTALL)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \(")


def field_types(system: str) -> dict[str, str]:
    """Output field name -> annotation text, read from the adapter's system message."""
    match = _OUTPUT_LIST.search(system)
    fields: dict[str, str] = {}
    for line in (match.group(1) if match else "").splitlines():
        head = _FIELD_LINE.match(line)
        if not head:
            continue
        depth, start = 1, head.end()
        for pos in range(start, len(line)):  # the annotation may itself hold brackets
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(line[pos], 0)
            if depth == 0:
                fields[head.group(1)] = line[start:pos]
                break
    return fields


def sections(text: str) -> dict[str, str]:
    """Input field name -> value, from ``[[ ## name ## ]]`` sections of a user message."""
    marks = list(_SECTION.finditer(text))
    out = {}
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        end = nxt.start() if nxt else len(text)
        out[mark.group(1)] = text[mark.end():end].strip()
    if out and marks:  # the final section is followed by the adapter's format reminder
        last = marks[-1].group(1)
        out[last] = out[last].split("\n\nRespond with")[0].strip()
    return out


def choices_of(type_text: str) -> list[str]:
    """Allowed values of a ``Literal[...]`` annotation, in order."""
    match = re.fullmatch(r"Literal\[(.*)\]", type_text.strip())
    if not match:
        return []
    return [part.strip().strip("'\"") for part in re.split(r",\s*(?=['\"\w])", match.group(1))]


def is_text(type_text: str) -> bool:
    return not choices_of(type_text) and type_text.split("[")[0].strip().lower() in ("str", "")


def fit(name: str, value: Any, type_text: str) -> Any:
    """Coerce a value to the field's type; free text was labelled where it was produced."""
    choices = choices_of(type_text)
    if choices:
        lowered = {c.lower(): c for c in choices}
        return lowered.get(str(value).lower(), choices[0])
    base = type_text.split("[")[0].strip().lower()
    if base in ("int", "float", "bool"):
        return {"int": 0, "float": 0.0, "bool": False}[base] if not isinstance(value, (int, float)) else value
    if base in ("list", "dict"):
        return value if isinstance(value, (list, dict)) else ([] if base == "list" else {})
    return placeholder(name) if value is None else value


def placeholder(name: str) -> str:
    return f"{LABEL} placeholder for `{name}`: no LM provider is configured (set FLAGSHIP_LM)."


def render_chat(values: dict[str, Any]) -> str:
    parts = []
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        parts.append(f"[[ ## {name} ## ]]\n{text}")
    return "\n\n".join(parts + ["[[ ## completed ## ]]"])
