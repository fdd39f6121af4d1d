"""Recursive Language Models: ``dspy.RLM`` refs whose code runs in this worker's Deno sandboxes.

Only workers that passed the sandbox probe at start-up serve the RLM pool, so
these operations find a sandbox pool here or refuse with ``NoCapableWorker``.
The long context stays a variable inside the sandbox; the model sees only its
size and a preview (DSPy's RLM design), never the whole text in a prompt.
"""

from __future__ import annotations

import time
from typing import Any

import dspy

from routing.errors import NoCapableWorker
from tasks.lm.history import clip
from tasks.lm.offline import OfflineLM
from tasks.ops.modules import (
    MODULE_INVOKERS,
    check_inputs,
    handle,
    jsonable,
    remember,
    run_with_lm,
    session_lm,
    store,
)
from tasks.ops.signatures import build_signature
from tasks.worker.allowlist import CallContext, operation
from tasks.worker.ref_store import RefEntry

#: Characters of each code cell and output kept in the trajectory summary.
trajectory_chars = 2000


@operation("rlm")
def create_rlm(ctx: CallContext, signature: Any = "context, query -> output", max_iters: int = 4,
               max_llm_calls: int = 12, max_output_chars: int = 4000, lm: str | None = None,
               sub_lm: str | None = None, ref_id: str | None = None) -> dict[str, Any]:
    sandboxes = ctx.worker.services.get("sandboxes")
    if sandboxes is None:
        raise NoCapableWorker(ctx.worker.pool.name, ["deno"])
    sig = build_signature(signature)
    refs = store(ctx)
    if lm is not None:
        refs.get(ctx.session_id, lm, kind="lm")
    sub = refs.get(ctx.session_id, sub_lm, kind="lm").obj if sub_lm else None
    module = dspy.RLM(sig, max_iters=max_iters, max_llm_calls=max_llm_calls, max_output_chars=max_output_chars,
                      sub_lm=sub, interpreter_factory=sandboxes.interpreter_factory)
    kwargs = {"signature": signature, "max_iters": max_iters, "max_llm_calls": max_llm_calls,
              "max_output_chars": max_output_chars, "lm": lm, "sub_lm": sub_lm}
    entry = refs.put(ctx.session_id, "rlm", module, {"op": "rlm", "kwargs": kwargs}, ref_id)
    remember(ctx, entry)
    return handle(ctx, entry, inputs=list(sig.input_fields), outputs=list(sig.output_fields))


def _clip(text: Any) -> str:
    return clip(text, trajectory_chars)


def invoke_rlm(ctx: CallContext, entry: RefEntry, inputs: dict[str, Any]) -> dict[str, Any]:
    module = entry.obj
    check_inputs("call", module.signature, inputs)
    lm = session_lm(ctx, entry.recipe["kwargs"].get("lm"))
    lms = {id(lm): lm}
    if module.sub_lm is not None:
        lms[id(module.sub_lm)] = module.sub_lm
    calls_before = {key: len(x.history) for key, x in lms.items()}
    started = time.monotonic()
    prediction = run_with_lm(lm, module, **inputs)
    steps = list(prediction.get("trajectory") or [])
    outputs = {name: jsonable(prediction.get(name)) for name in module.signature.output_fields}
    return {
        "ref_id": entry.ref_id, "worker": ctx.node, "outputs": outputs, "model": lm.model,
        "offline": isinstance(lm, OfflineLM),
        "trajectory": {
            "iterations": len(steps),
            "llm_calls": sum(len(x.history) - calls_before[key] for key, x in lms.items()),
            "elapsed_s": round(time.monotonic() - started, 3),
            "steps": [{"reasoning": _clip(s.get("reasoning", "")), "code": _clip(s.get("code", "")),
                       "output": _clip(s.get("output", ""))} for s in steps],
            "final_reasoning": _clip(prediction.get("final_reasoning") or ""),
        },
    }


MODULE_INVOKERS["rlm"] = invoke_rlm
