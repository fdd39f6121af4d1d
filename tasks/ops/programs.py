"""User programs and DSPy's own modules as refs: built by name, run under the session's LM, state in and out.

``program`` builds ``"package.module:Name"`` (a ``dspy.Module`` subclass, or a
function returning one, from the worker's program modules) or ``"dspy:<Module>"``
(:data:`DSPY_MODULES`) with JSON constructor arguments; functions among those
(tools, reward functions) are program paths too, modules a path or a ``{"$ref"}``
of the session. Optional ``state`` (``dump_state()`` JSON) is applied with DSPy's
``load_state`` (never pickle, never an LM's ``api_base``). The recipe keeps path,
arguments and state, so a rehydrated session rebuilds the program as it was.

Every run gets the session's LM (``dspy.context``; LMs the program set on its own
predictors win) and, on Deno workers, the worker's sandbox pool as DSPy's
``interpreter_factory``; elsewhere a program that wants an interpreter fails with
``NoCapableWorker``. An exception from the user's code is ``ProgramError``.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from typing import Any

import dspy

from routing.errors import (
    FlagshipError,
    InvalidArgument,
    NoCapableWorker,
    ProgramError,
    UnknownProgram,
)
from tasks.lm.offline import OfflineLM
from tasks.ops.modules import (
    MODULE_INVOKERS,
    REF_KEY,
    check_inputs,
    handle,
    remember,
    run_with_lm,
    session_lm,
    store,
)
from tasks.ops.signatures import build_signature
from tasks.worker.allowlist import CallContext, operation
from tasks.worker.programs import ProgramCatalog, split_path
from tasks.worker.ref_store import RefEntry

#: DSPy modules a producer may build as ``"dspy:<Name>"``.
DSPY_MODULES = ("Predict", "ChainOfThought", "ReAct", "ProgramOfThought", "CodeAct", "RLM", "BestOfN", "Refine",
                "MultiChainComparison")
#: Those that run model-written code: they get the worker's sandbox pool, and need a Deno worker.
INTERPRETED = frozenset({"ProgramOfThought", "CodeAct", "RLM"})
#: Lines of a user's traceback kept in a ``ProgramError``.
traceback_lines = 40


def catalog(ctx: CallContext) -> ProgramCatalog:
    programs: ProgramCatalog | None = ctx.worker.services.get("programs")
    if programs is None:
        programs = ProgramCatalog((), {})
    return programs


def interpreter_factory(ctx: CallContext) -> Callable[[], Any]:
    """The worker's sandbox pool; on a worker without Deno, a factory that refuses with ``NoCapableWorker``."""
    sandboxes = ctx.worker.services.get("sandboxes")
    if sandboxes is not None:
        return sandboxes.interpreter_factory  # type: ignore[no-any-return]
    pool = ctx.worker.pool.name

    def no_sandbox() -> Any:
        raise NoCapableWorker(pool, ["deno"])

    return no_sandbox


def to_json(value: Any, depth: int = 0) -> Any:
    """Outputs as JSON: containers walked, pydantic models dumped, anything else its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 20:
        return str(value)
    if hasattr(value, "model_dump"):
        return to_json(value.model_dump(mode="json"), depth + 1)
    if isinstance(value, dict):
        return {str(k): to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json(v, depth + 1) for v in value]
    if isinstance(value, dspy.Example):
        return to_json(value.toDict(), depth + 1)
    return str(value)


def user_error(path: str, exc: BaseException) -> ProgramError:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines)
    kept = "\n".join(text.splitlines()[-traceback_lines:])
    return ProgramError(path, type(exc).__name__, str(exc)[:2000], kept)


def _function(ctx: CallContext, path: str, name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise InvalidArgument("program", f"{path}: {name} must be a 'package.module:function' path")
    return catalog(ctx).function(value)


def _module_argument(ctx: CallContext, path: str, value: Any) -> dspy.Module:
    """``module=`` of BestOfN/Refine: a program path, or ``{"$ref": id}`` of a module ref of this session."""
    if isinstance(value, dict) and value.keys() == {REF_KEY}:
        entry = store(ctx).get(ctx.session_id, str(value[REF_KEY]))
        if not isinstance(entry.obj, dspy.Module):
            raise InvalidArgument("program", f"{path}: module {value[REF_KEY]} is a {entry.kind}, not a module")
        return entry.obj
    if isinstance(value, str):
        return build(ctx, value, {})
    raise InvalidArgument("program", f"{path}: module must be a program path or a ModuleRef of this session")


def _dspy_kwargs(ctx: CallContext, path: str, name: str, init: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(init)
    if "signature" in kwargs:
        kwargs["signature"] = build_signature(kwargs["signature"], kwargs.pop("instructions", None))
    if "tools" in kwargs:
        tools = kwargs["tools"]
        if not isinstance(tools, list):
            raise InvalidArgument("program", f"{path}: tools must be a list of 'package.module:function' paths")
        kwargs["tools"] = [_function(ctx, path, "each tool", tool) for tool in tools]
    if "reward_fn" in kwargs:
        kwargs["reward_fn"] = _function(ctx, path, "reward_fn", kwargs["reward_fn"])
    if "module" in kwargs:
        kwargs["module"] = _module_argument(ctx, path, kwargs["module"])
    if "sub_lm" in kwargs and kwargs["sub_lm"] is not None:
        kwargs["sub_lm"] = store(ctx).get(ctx.session_id, str(kwargs["sub_lm"]), kind="lm").obj
    if name in INTERPRETED:
        if ctx.worker.services.get("sandboxes") is None:
            raise NoCapableWorker(ctx.worker.pool.name, ["deno"])
        if "interpreter_factory" in kwargs:
            raise InvalidArgument("program", f"{path}: the worker chooses the interpreter (its Deno sandboxes)")
        kwargs["interpreter_factory"] = interpreter_factory(ctx)
    return kwargs


def build(ctx: CallContext, path: str, init: dict[str, Any]) -> dspy.Module:
    """The program ``path`` built with ``init`` (``UnknownProgram``, ``InvalidArgument`` or ``ProgramError``)."""
    module_name, name = split_path(path)
    if module_name == "dspy":
        if name not in DSPY_MODULES:
            raise UnknownProgram(path, f"DSPy modules that may be built: {', '.join(DSPY_MODULES)}")
        factory: Any = getattr(dspy, name)
        kwargs = _dspy_kwargs(ctx, path, name, init)
    else:
        factory, kwargs = catalog(ctx).program(path), init
    try:  # a module class's own __init__ (DSPy's metaclass hides it behind *args, **kwargs)
        if isinstance(factory, type):
            inspect.signature(factory.__init__).bind(None, **kwargs)
        else:
            inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise InvalidArgument("program", f"{path}: {exc}") from None
    try:
        with dspy.context(interpreter_factory=interpreter_factory(ctx)):
            program = factory(**kwargs)
    except FlagshipError:
        raise
    except Exception as exc:
        raise user_error(path, exc) from None
    if not isinstance(program, dspy.Module):
        raise InvalidArgument("program", f"{path} returned a {type(program).__name__}, not a dspy.Module")
    return program


def apply_state(path: str, program: dspy.Module, state: Any) -> None:
    """DSPy's ``load_state`` (an LM's endpoint in the state is ignored, as DSPy's safe default does)."""
    if not isinstance(state, dict):
        raise InvalidArgument("program", f"{path}: state must be a JSON object from dump_state() or save()")
    state = {k: v for k, v in state.items() if k != "metadata"}  # save()'s dependency versions
    try:
        program.load_state(state)
    except Exception as exc:
        raise InvalidArgument("program", f"{path}: state does not fit the program "
                                         f"({type(exc).__name__}: {str(exc)[:300]})") from None


@operation("program")
def create_program(ctx: CallContext, path: str, init: dict[str, Any] | None = None, state: Any = None,
                   lm: str | None = None, ref_id: str | None = None) -> dict[str, Any]:
    """A program ref: ``path`` built with ``init`` (JSON constructor arguments), ``state`` loaded."""
    init = {} if init is None else init
    if not isinstance(init, dict):
        raise InvalidArgument("program", "init must be a JSON object of constructor arguments")
    if lm is not None:
        store(ctx).get(ctx.session_id, lm, kind="lm")  # typed error now, not at first call
    program = build(ctx, path, init)
    if state is not None:
        apply_state(path, program, state)
    kwargs = {"path": path, "init": init, "state": state, "lm": lm}
    entry = store(ctx).put(ctx.session_id, "program", program, {"op": "program", "kwargs": kwargs}, ref_id)
    remember(ctx, entry)
    signature = getattr(program, "signature", None)
    fields = {"inputs": list(signature.input_fields), "outputs": list(signature.output_fields)} \
        if isinstance(signature, type) and issubclass(signature, dspy.Signature) else {}
    return handle(ctx, entry, path=path, predictors=[name for name, _ in program.named_predictors()], **fields)


def check_program_inputs(path: str, program: dspy.Module, inputs: dict[str, Any]) -> None:
    signature = getattr(program, "signature", None)
    if isinstance(signature, type) and issubclass(signature, dspy.Signature):
        check_inputs("call", signature, inputs)
        return
    try:
        inspect.signature(program.forward).bind(**inputs)
    except TypeError as exc:
        raise InvalidArgument("call", f"{path}: {exc}") from None


def run_program(ctx: CallContext, entry: RefEntry, inputs: dict[str, Any]) -> tuple[Any, dspy.BaseLM]:
    """Run a program ref: (what ``forward`` returned, the session LM it ran under)."""
    path = entry.recipe["kwargs"]["path"]
    program = entry.obj
    check_program_inputs(path, program, inputs)
    lm = session_lm(ctx, entry.recipe["kwargs"].get("lm"))
    try:  # provider failures typed as for any module; what is left came from the user's code
        with dspy.context(interpreter_factory=interpreter_factory(ctx)):
            return run_with_lm(lm, program, **inputs), lm
    except FlagshipError:
        raise
    except Exception as exc:
        raise user_error(path, exc) from None


def outputs_of(result: Any) -> dict[str, Any]:
    """A Prediction's fields (ReAct's trajectory too), a dict as is, anything else as ``output``."""
    if isinstance(result, dspy.Prediction):
        return {name: to_json(result.get(name)) for name in result.keys()}
    if isinstance(result, dict):
        return {str(k): to_json(v) for k, v in result.items()}
    return {"output": to_json(result)}


def invoke_program(ctx: CallContext, entry: RefEntry, inputs: dict[str, Any]) -> dict[str, Any]:
    result, lm = run_program(ctx, entry, inputs)
    return {"ref_id": entry.ref_id, "worker": ctx.node, "outputs": outputs_of(result), "model": lm.model,
            "offline": isinstance(lm, OfflineLM), "path": entry.recipe["kwargs"]["path"]}


@operation("dump_state")
def dump_state(ctx: CallContext, ref: str) -> dict[str, Any]:
    """The program's state as DSPy's ``dump_state()`` JSON; the recipe keeps it (a rehydration restores it)."""
    entry = store(ctx).get(ctx.session_id, ref)
    if not isinstance(entry.obj, dspy.Module):
        raise InvalidArgument("dump_state", f"{ref} is a {entry.kind}, not a module")
    state = to_json(entry.obj.dump_state())
    if entry.kind == "program":
        entry.recipe["kwargs"]["state"] = state
        remember(ctx, entry)
    return {"ref_id": entry.ref_id, "state": state}


MODULE_INVOKERS["program"] = invoke_program
