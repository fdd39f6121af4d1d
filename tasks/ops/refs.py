"""Operations on refs as a whole: list, release, and the session's prompt history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from routing import names
from routing.fleet import recipes
from tasks.lm.history import history_entries
from tasks.ops.modules import handle, store
from tasks.worker.allowlist import CallContext, operation
from tasks.worker.ref_store import RefEntry

#: Most history entries one call returns.
max_history_entries = 100


@operation("refs")
def list_refs(ctx: CallContext) -> list[dict[str, Any]]:
    return [handle(ctx, e) for e in store(ctx).session_refs(ctx.session_id)]


@operation("release_ref")
def release_ref(ctx: CallContext, ref: str) -> dict[str, Any]:
    released = store(ctx).release(ctx.session_id, ref)
    recipes.forget(ctx.worker.redis, ctx.session_id, ref)
    ctx.worker.redis.hdel(names.session_contexts_key(ctx.session_id), ref)  # a context ref's stored copy
    return {"released": released, "refs_left": len(store(ctx).session_refs(ctx.session_id))}


def own_lms(programs: list[RefEntry], seen: set[int]) -> list[tuple[str, Any]]:
    """LMs programs set on their own predictors (not session refs), each once, under the program's ref id."""
    found = []
    for entry in programs:
        for _, predictor in entry.obj.named_predictors():
            lm = getattr(predictor, "lm", None)
            if lm is not None and id(lm) not in seen:
                seen.add(id(lm))
                found.append((entry.ref_id, lm))
    return found


@operation("history")
def history(ctx: CallContext, lm: str | None = None, n: int = 6) -> dict[str, Any]:
    """The session's last ``n`` LM calls (of one LM ref, or of all of the session's LMs), oldest first.

    Entries come only from this session's LM objects, so another session's
    prompts never appear. After a rehydration the history held by the dead
    worker is gone; ``complete`` says so.
    """
    n = max(0, min(int(n), max_history_entries))
    refs = store(ctx)
    lms = [refs.get(ctx.session_id, lm, kind="lm")] if lm else refs.session_refs(ctx.session_id, kind="lm")
    sources = [(entry.ref_id, entry.obj) for entry in lms]
    if not lm:
        sources += own_lms(refs.session_refs(ctx.session_id, kind="program"), {id(obj) for _, obj in sources})
    entries = []
    for ref_id, lm_obj in sources:
        for item in history_entries(lm_obj, n=n):
            entries.append({**item, "lm_ref": ref_id})
    entries.sort(key=lambda e: e["timestamp"] or datetime.min.isoformat())
    rehydrations = int(ctx.worker.redis.hget(names.session_key(ctx.session_id), "rehydrations") or 0)
    return {
        "entries": entries[-n:] if n else [],
        "worker": ctx.node,
        "complete": rehydrations == 0,
        "note": None if rehydrations == 0 else
        f"session was rebuilt on a new worker {rehydrations} time(s); earlier history died with the old worker",
    }
