"""Scripted replies for the OpenAI-protocol test server: ReAct steps, ProgramOfThought code, else the offline rules.

Deterministic in the prompt, so a program run through the fleet and the same program
run in one process against the same server get the same answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.lm.offline import reply_for
from tasks.lm.offline_format import field_types, fit, render_chat, sections

#: What the sandboxed code prints: ``emscripten`` proves it ran in Pyodide, not on the worker.
POT_CODE = "import sys\nanswer = sum(range(10))\nprint(answer, sys.platform)"
_OBSERVATION = re.compile(r"\[\[ ## observation_0 ## \]\]\n(.*?)(?:\n\n\[\[|\Z)", re.DOTALL)


def _values(fields: dict[str, str], inputs: dict[str, str], text: str) -> dict[str, Any] | None:
    if "next_tool_name" in fields:
        if "observation_0" in text:
            return {"next_thought": "I know the status now.", "next_tool_name": "finish", "next_tool_args": {}}
        return {"next_thought": "Look the order up.", "next_tool_name": "lookup_order",
                "next_tool_args": {"order_id": "A-17"}}
    if "generated_code" in fields:
        return {"reasoning": "Compute it in Python.", "generated_code": f"```python\n{POT_CODE}\n```"}
    if "code_output" in inputs or "final_generated_code" in inputs:
        printed = inputs.get("code_output", "").strip()
        try:  # the adapter shows the output as a JSON string
            printed = str(json.loads(printed))
        except ValueError:
            pass
        return {"reasoning": "The code printed it.", "answer": printed.strip()}
    if "answer" in fields and "observation_0" in text:
        found = _OBSERVATION.search(text)
        return {"reasoning": "From the tool.", "answer": f"Order A-17: {found.group(1).strip() if found else '?'}"}
    return None


def scripted_reply(messages: list[dict[str, Any]]) -> str:
    system = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    fields = field_types(system)
    last = users[-1] if users else ""
    values = _values(fields, sections(last), last)
    if values is None:
        return reply_for(messages)
    return render_chat({name: fit(name, values.get(name), kind) for name, kind in fields.items()})
