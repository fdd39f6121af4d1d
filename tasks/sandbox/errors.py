"""Sandbox failures as DSPy's interpreter protocol wants them, and as the project's typed errors.

DSPy's ``CodeInterpreter`` protocol: code that fails in a healthy interpreter
raises ``CodeExecutionError`` (or ``SyntaxError``), which ``dspy.RLM`` reports
back to the model; anything the code cannot repair (the process died, the
protocol broke, the session ended) raises a bare ``CodeInterpreterError``,
which ends the RLM call. The classes here are those terminal failures: each is
a ``CodeInterpreterError`` (never a ``CodeExecutionError``) and the
``routing.errors`` class of the same name.

On the wire they *are* the ``routing.errors`` class: Celery's JSON result
backend stores an exception as ``__module__`` + ``__qualname__`` + ``args``,
and ``routing`` cannot import ``dspy``, so each class here names itself
``routing.errors.<Name>`` and the producer rebuilds the routing class from the
same args.
"""

from __future__ import annotations

from typing import Any

from dspy.primitives.code_interpreter import CodeInterpreterError
from dspy.utils.exceptions import DSPyError

from routing import errors

__all__ = ["InterpreterFailure", "SandboxClosed", "SandboxCrashed", "SandboxTimeout"]

#: The module the result backend records, so producers rebuild the ``routing.errors`` class.
_WIRE_MODULE = errors.__name__


class InterpreterFailure(CodeInterpreterError):
    """DSPy's half of a terminal sandbox failure; listed after the ``routing.errors`` base.

    ``DSPyError.__init__`` takes one message and would fold the project error's
    fields into one string; here ``args`` stay the fields, as the backend needs.
    """

    def __init__(self, *args: Any) -> None:
        DSPyError.__init__(self)  # DSPy's metadata attributes (code, model, ...), all unset
        BaseException.__init__(self, *args)

    @property
    def message(self) -> str:
        """DSPy's ``message`` attribute: the project error's text."""
        return str(self)

    @message.setter
    def message(self, _value: str) -> None:
        pass  # DSPyError.__init__ assigns it; the text comes from the fields

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (and copied) as what it is on the wire: the ``routing.errors`` class."""
        return getattr(errors, type(self).__name__), self.args


class SandboxCrashed(errors.SandboxCrashed, InterpreterFailure):
    """Deno exited, broke the JSON-RPC protocol, or could not start; the interpreter is gone."""

    __module__ = _WIRE_MODULE


class SandboxTimeout(errors.SandboxTimeout, InterpreterFailure):
    """Code ran past the execute limit; the process was killed."""

    __module__ = _WIRE_MODULE


class SandboxClosed(errors.SandboxClosed, SandboxCrashed):
    """The interpreter or its pool was shut down; DSPy's protocol: it does not restart."""

    __module__ = _WIRE_MODULE
