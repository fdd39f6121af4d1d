"""Context refs: a long text held on the worker, so repeated queries over it send only a handle.

``context(text)`` keeps the text in the ref store (kind ``"context"``) and a copy
in the session's contexts hash (``flagship:session:<id>:contexts``, ref id ->
text), which expires, is renewed and is deleted with the session. Its recipe
names no text: a rehydration rebuilds the ref from that stored copy. A big text
reaches the worker by reference anyway (``routing.broker.claims``), never inside the
message. Module inputs name a context as ``{"$ref": "<ref id>"}``
(``tasks.ops.modules.resolve_inputs``, used by ``call`` for every module kind).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from routing import names
from routing.errors import InvalidArgument, RefNotFound
from tasks.ops.modules import handle, remember, store
from tasks.worker.allowlist import CallContext, operation


@operation("context")
def create_context(ctx: CallContext, text: str | None = None, ref_id: str | None = None) -> dict[str, Any]:
    """Hold ``text`` as a context ref; without ``text``, rebuild ``ref_id`` from its stored copy (rehydration)."""
    copies = names.session_contexts_key(ctx.session_id)
    redis = ctx.worker.redis
    given = text is not None
    if not given:
        if not isinstance(ref_id, str):
            raise InvalidArgument("context", "text must be a string")
        text = redis.hget(copies, ref_id)
        if text is None:  # the copy expired with the session, or the ref was never made
            raise RefNotFound(ref_id, ctx.session_id, ctx.node)
    elif not isinstance(text, str):
        raise InvalidArgument("context", "text must be a string")
    entry = store(ctx).put(ctx.session_id, "context", text, {"op": "context", "kwargs": {}}, ref_id)
    if given:
        pipe = redis.pipeline()
        pipe.hset(copies, entry.ref_id, text)
        pipe.pexpire(copies, int(ctx.worker.book.ttl(ctx.session_id) * 1000))
        pipe.execute()
    remember(ctx, entry)  # after the copy: a recorded recipe always finds its text
    return handle(ctx, entry, chars=len(text))


@operation("payload_size")
def payload_size(ctx: CallContext, data: Any = None, digest: bool = False) -> dict[str, Any]:
    """How big ``data`` arrived (its length; with ``digest``, the SHA-256 of a string): benchmarks and checks."""
    size = len(data) if isinstance(data, (str, list, dict)) else 0
    sha256 = hashlib.sha256(data.encode()).hexdigest() if digest and isinstance(data, str) else None
    return {"node": ctx.node, "pid": os.getpid(), "size": size, "sha256": sha256}
