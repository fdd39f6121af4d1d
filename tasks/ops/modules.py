"""Operations that create and use DSPy objects kept in the worker's ref store.

Every LM call runs under ``dspy.context(lm=...)`` with the LM of the module or of
the session, so threads of one worker never share DSPy's global configuration and
one session's prompts never land in another session's LM history.
"""

from __future__ import annotations

import json
from typing import Any

import dspy
from celery import current_app

from routing import names
from routing.errors import InvalidArgument, LMError, RefError
from routing.fleet import recipes
from tasks.lm.offline import OfflineLM
from tasks.lm.provider import build_lm, translate_lm_error
from tasks.ops import streaming
from tasks.ops.signatures import build_signature
from tasks.worker.allowlist import CallContext, operation
from tasks.worker.ref_store import RefEntry, RefStore

#: A module input naming a context ref held by the session: ``{"$ref": "<ref id>"}``.
REF_KEY = "$ref"
#: Module kinds a producer may create, and the DSPy class of each.
MODULE_KINDS: dict[str, Any] = {"predict": dspy.Predict, "chain_of_thought": dspy.ChainOfThought}


def store(ctx: CallContext) -> RefStore:
    refs: RefStore = ctx.worker.services["refs"]
    return refs


def handle(ctx: CallContext, entry: RefEntry, **extra: Any) -> dict[str, Any]:
    """The JSON a producer holds instead of the object."""
    return {"ref_id": entry.ref_id, "session_id": entry.session_id, "worker": ctx.node, "kind": entry.kind, **extra}


def remember(ctx: CallContext, entry: RefEntry) -> None:
    recipes.record(ctx.worker.redis, ctx.session_id, entry.ref_id, entry.recipe["op"], entry.recipe["kwargs"],
                   ctx.worker.book.ttl(ctx.session_id))


@operation("lm")
def create_lm(ctx: CallContext, model: str | None = None, temperature: float | None = None,
              max_tokens: int | None = None, api_base: str | None = None, api_key: str | None = None,
              default: bool = False, ref_id: str | None = None) -> dict[str, Any]:
    """An LM for this session; ``default=True`` (or being the first) makes it the session default.

    Types and bounds of the arguments were checked by the allow-list (``routing.validate.ARGUMENTS``).
    """
    if api_base is not None and not ctx.settings.lm.api_base_allowed(api_base):
        raise InvalidArgument("lm", f"api_base {api_base!r} is not allowed on this worker; "
                                    "list it in FLAGSHIP_LM_API_BASES (comma-separated prefixes, or *)")
    lm = build_lm(model, temperature, max_tokens, api_base=api_base, api_key=api_key, settings=ctx.settings.lm)
    kwargs = {"model": model, "temperature": temperature, "max_tokens": max_tokens, "api_base": api_base,
              "default": bool(default)}
    refs = store(ctx)
    entry = refs.put(ctx.session_id, "lm", lm, {"op": "lm", "kwargs": kwargs}, ref_id)
    remember(ctx, entry)
    if default or ctx.session_id not in refs.default_lm:
        make_default(ctx, entry)
    return handle(ctx, entry, model=lm.model, offline=isinstance(lm, OfflineLM),
                  default=refs.default_lm[ctx.session_id] == entry.ref_id)


@operation("set_default_lm")
def set_default_lm(ctx: CallContext, lm: str) -> dict[str, Any]:
    """The session's equivalent of ``dspy.configure(lm=...)``, scoped to the session."""
    entry = store(ctx).get(ctx.session_id, lm, kind="lm")
    make_default(ctx, entry)
    return handle(ctx, entry, model=entry.obj.model, default=True)


def make_default(ctx: CallContext, entry: RefEntry) -> None:
    """Make ``entry`` the session default, in memory and in the recipes (so a rebuild agrees)."""
    refs = store(ctx)
    previous = refs.default_lm.get(ctx.session_id)
    if previous not in (None, entry.ref_id):
        try:
            old = refs.get(ctx.session_id, previous, kind="lm")
        except RefError:
            old = None
        if old is not None:
            old.recipe["kwargs"]["default"] = False
            remember(ctx, old)
    refs.default_lm[ctx.session_id] = entry.ref_id
    entry.recipe["kwargs"]["default"] = True
    remember(ctx, entry)


def session_lm(ctx: CallContext, lm_ref: str | None) -> dspy.BaseLM:
    """The LM a call uses: the given ref, else the session default, else a new configured default."""
    refs = store(ctx)
    if lm_ref is not None:
        return refs.get(ctx.session_id, lm_ref, kind="lm").obj
    default = refs.default_lm.get(ctx.session_id)
    if default is not None:
        return refs.get(ctx.session_id, default, kind="lm").obj
    create_lm(ctx, default=True)
    return refs.get(ctx.session_id, refs.default_lm[ctx.session_id], kind="lm").obj


def _create_module(ctx: CallContext, kind: str, signature: Any, lm: str | None, instructions: str | None,
                   ref_id: str | None) -> dict[str, Any]:
    sig = build_signature(signature, instructions)
    if lm is not None:
        store(ctx).get(ctx.session_id, lm, kind="lm")  # typed error now, not at first call
    module = MODULE_KINDS[kind](sig)
    kwargs = {"signature": signature, "lm": lm, "instructions": instructions}
    entry = store(ctx).put(ctx.session_id, kind, module, {"op": kind, "kwargs": kwargs}, ref_id)
    remember(ctx, entry)
    return handle(ctx, entry, inputs=list(sig.input_fields), outputs=list(sig.output_fields))


@operation("predict")
def create_predict(ctx: CallContext, signature: Any, lm: str | None = None, instructions: str | None = None,
                   ref_id: str | None = None) -> dict[str, Any]:
    return _create_module(ctx, "predict", signature, lm, instructions, ref_id)


@operation("chain_of_thought")
def create_chain_of_thought(ctx: CallContext, signature: Any, lm: str | None = None,
                            instructions: str | None = None, ref_id: str | None = None) -> dict[str, Any]:
    return _create_module(ctx, "chain_of_thought", signature, lm, instructions, ref_id)


def jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def module_signature(module: Any) -> type[dspy.Signature]:
    """Predict keeps its signature; ChainOfThought keeps it on its inner predictor."""
    signature = getattr(module, "signature", None) or module.predict.signature
    return signature  # type: ignore[no-any-return]


def check_inputs(op: str, signature: type[dspy.Signature], inputs: Any) -> None:
    if not isinstance(inputs, dict):
        raise InvalidArgument(op, "inputs must be a JSON object")
    missing = [f for f in signature.input_fields if f not in inputs]
    unknown = [f for f in inputs if f not in signature.input_fields]
    if missing or unknown:
        expected = list(signature.input_fields)
        raise InvalidArgument(op, f"inputs missing {missing}, unknown {unknown}; expected {expected}")


def run_with_lm(lm: dspy.BaseLM, fn: Any, **inputs: Any) -> Any:
    """Call ``fn`` under ``lm``, turning provider failures into the project's typed errors."""
    try:
        with dspy.context(lm=lm):
            target = streaming.take()
            return fn(**inputs) if target is None else streaming.run(target, fn, inputs)
    except LMError:
        raise
    except Exception as exc:
        typed = translate_lm_error(getattr(lm, "model", "?"), exc)
        if typed is not None:
            raise typed from None
        raise


def resolve_inputs(ctx: CallContext, inputs: Any) -> Any:
    """``inputs`` with every ``{"$ref": "<context ref id>"}`` value replaced by that context's text."""
    if not isinstance(inputs, dict):
        return inputs
    resolved = dict(inputs)
    for name, value in inputs.items():
        if isinstance(value, dict) and value.keys() == {REF_KEY}:
            if not isinstance(value[REF_KEY], str):
                raise InvalidArgument("call", f"input {name!r}: {REF_KEY} must be a ref id")
            resolved[name] = store(ctx).get(ctx.session_id, value[REF_KEY], kind="context").obj
    return resolved


@operation("call")
def call_module(ctx: CallContext, ref: str, inputs: dict[str, Any], program: str | None = None,
                stream: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a module ref with keyword inputs (a context ref as ``{"$ref": id}``); returns every output field.

    ``program``: the program path the producer believes the ref holds (shown in Flower); checked.
    ``stream``: ``{"fields": [...] or None, "id": task id}`` streams those outputs as they come to the stream of
    ``id`` (default: this task's; a rerun under a new task id names its first one's) (``tasks.ops.streaming``).
    """
    target = None if stream is None else stream_target(ctx, *streaming.parse("call", stream))
    with streaming.streamed(target):
        return _call_module(ctx, ref, inputs, program)


def stream_target(ctx: CallContext, fields: list[str] | None, stream_id: str | None) -> streaming.StreamTarget:
    if ctx.call_id is None:
        raise InvalidArgument("call", "only a call sent as a task can stream")
    expires = current_app.conf.result_expires
    ttl_s = int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires or 86400)
    return streaming.StreamTarget(ctx.worker.redis, names.call_stream(stream_id or ctx.call_id), ctx.call_id,
                                  ctx.session_id, fields, ttl_s)


def _call_module(ctx: CallContext, ref: str, inputs: dict[str, Any], program: str | None) -> dict[str, Any]:
    entry = store(ctx).get(ctx.session_id, ref)
    if entry.kind in ("lm", "context"):
        raise InvalidArgument("call", f"{ref} is {'an LM' if entry.kind == 'lm' else 'a context'}; call a module ref")
    if program is not None and entry.recipe["kwargs"].get("path") != program:
        raise InvalidArgument("call", f"{ref} holds {entry.recipe['kwargs'].get('path') or entry.kind}, not {program}")
    inputs = resolve_inputs(ctx, inputs)
    invoke = MODULE_INVOKERS.get(entry.kind)
    if invoke is not None:
        return invoke(ctx, entry, inputs)
    module = entry.obj
    check_inputs("call", module_signature(module), inputs)
    lm = session_lm(ctx, entry.recipe["kwargs"].get("lm"))
    prediction = run_with_lm(lm, module, **inputs)
    outputs = {name: jsonable(prediction.get(name)) for name in prediction.keys()}
    return {"ref_id": entry.ref_id, "worker": ctx.node, "outputs": outputs, "model": lm.model,
            "offline": isinstance(lm, OfflineLM)}


#: Kinds whose call is not a plain module call (RLM registers itself here).
MODULE_INVOKERS: dict[str, Any] = {}
