"""Recursive Language Models: ``dspy.RLM`` refs whose code runs in this worker's Deno sandboxes.

Only workers that passed the sandbox probe at start-up serve the RLM pool, so
these operations find a sandbox pool here or refuse with ``NoCapableWorker``.
The long context stays a variable inside the sandbox; the model sees only its
size and a preview (DSPy's RLM design), never the whole text in a prompt.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dspy

from routing.errors import InvalidArgument, NoCapableWorker
from tasks.dspy_ops import (
    MODULE_INVOKERS,
    check_inputs,
    handle,
    jsonable,
    remember,
    run_with_lm,
    session_lm,
    store,
)
from tasks.lm_provider import clip
from tasks.offline_lm import OfflineLM
from tasks.operations import CallContext, operation
from tasks.refs import RefEntry
from tasks.signatures import build_signature
from tasks.worker_state import WorkerState

#: Characters of each code cell and output kept in the trajectory summary.
trajectory_chars = 2000


def install_sandbox_pool(state: WorkerState) -> None:
    """Pre-start sandboxes (default: one per thread) so an RLM call never waits for Pyodide."""
    from tasks.sandbox.pool import SandboxPool

    state.services["sandboxes"] = SandboxPool(
        size=int(os.environ.get("FLAGSHIP_SANDBOX_POOL_SIZE", state.concurrency)),
        execute_timeout_s=float(os.environ.get("FLAGSHIP_SANDBOX_TIMEOUT_S", 30.0)),
        heap_mb=int(os.environ.get("FLAGSHIP_SANDBOX_HEAP_MB", 512)),
    )


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument("rlm", f"{name} must be an integer between {low} and {high}")
    return value


@operation("rlm")
def create_rlm(ctx: CallContext, signature: Any = "context, query -> output", max_iters: int = 4,
               max_llm_calls: int = 12, max_output_chars: int = 4000, lm: str | None = None,
               sub_lm: str | None = None, ref_id: str | None = None) -> dict[str, Any]:
    sandboxes = ctx.worker.services.get("sandboxes")
    if sandboxes is None:
        raise NoCapableWorker(ctx.worker.pool.name, ["deno"])
    _check_int("max_iters", max_iters, 1, 50)
    _check_int("max_llm_calls", max_llm_calls, 1, 500)
    _check_int("max_output_chars", max_output_chars, 100, 1_000_000)
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
