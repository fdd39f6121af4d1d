"""The sandbox fails the way DSPy's interpreter protocol says, with the project's typed errors.

Real Deno + Pyodide processes, no mocks. DSPy's protocol: code that fails in a
healthy interpreter raises ``CodeExecutionError`` (RLM shows it to the model and
carries on); a dead process, a timeout or a session that ended raises a terminal
``CodeInterpreterError`` (RLM lets it through). Ours are also ``routing.errors``
types, and travel as such. Sandbox starts are costly (~3.5 s CPU, ~150 MB), so
one interpreter is shared and only the tests that end one start their own.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from celery import Celery
from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError
from dspy.primitives.python_interpreter import PythonInterpreter
from dspy.utils import DummyLM

from routing import errors
from tasks.sandbox.drain import PipeTail, tail_bytes
from tasks.sandbox.errors import SandboxClosed, SandboxCrashed, SandboxTimeout
from tasks.sandbox.interpreter import SandboxInterpreter
from tasks.sandbox.settings import SandboxSettings
from tasks.sandbox.setup import ensure_sandbox_cache

pytestmark = pytest.mark.sandbox

#: WebAssembly cap of the shared interpreter: Pyodide starts with ~20 MB.
WASM_MB = 128
#: Far above anything here but a hang: a blocked pipe would end in SandboxTimeout.
GENEROUS_TIMEOUT_S = 60.0
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def deno_dir() -> Path:
    return ensure_sandbox_cache()


@pytest.fixture(scope="module")
def interp(deno_dir: Path) -> Iterator[SandboxInterpreter]:
    interpreter = SandboxInterpreter(execute_timeout_s=GENEROUS_TIMEOUT_S, wasm_mb=WASM_MB, deno_dir=deno_dir)
    interpreter.start()
    yield interpreter
    interpreter.shutdown()


# -- the error classes ---------------------------------------------------------

TERMINAL = [
    (SandboxCrashed("Deno exited (code 3)"), errors.SandboxCrashed),
    (SandboxTimeout(2.5), errors.SandboxTimeout),
    (SandboxClosed("the sandbox pool is shut down"), errors.SandboxClosed),
]


@pytest.mark.parametrize(("error", "wire_type"), TERMINAL, ids=lambda x: type(x).__name__)
def test_terminal_errors_are_dspy_interpreter_errors_and_project_errors(
    error: Any, wire_type: type[errors.FlagshipError]
) -> None:
    assert isinstance(error, CodeInterpreterError) and not isinstance(error, CodeExecutionError)
    assert isinstance(error, wire_type) and isinstance(error, errors.SandboxError)
    assert error.args == tuple(error.as_dict().values())  # DSPyError did not fold the fields into a string
    assert str(error) == wire_type(*error.args).__str__() == error.message


@pytest.mark.parametrize(("error", "wire_type"), TERMINAL, ids=lambda x: type(x).__name__)
def test_terminal_errors_reach_the_producer_as_the_routing_type_with_their_fields(
    error: errors.FlagshipError, wire_type: type[errors.FlagshipError]
) -> None:
    backend = Celery(backend="cache+memory://").backend
    stored = json.loads(json.dumps(backend.prepare_exception(error, "json")))  # what the JSON backend keeps
    rebuilt = backend.exception_to_python(stored)
    assert type(rebuilt) is wire_type and rebuilt.as_dict() == error.as_dict()
    assert type(errors.error_from_json(errors.error_to_json(error))) is wire_type  # per-item batch errors
    assert type(pickle.loads(pickle.dumps(error))) is wire_type


def test_settings_cap_webassembly_memory_from_the_environment(
    deno_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SandboxSettings.from_env({}).wasm_mb == 512
    assert SandboxSettings.from_env({"FLAGSHIP_SANDBOX_WASM_MB": "64"}).wasm_mb == 64
    with pytest.raises(ValueError, match="FLAGSHIP_SANDBOX_WASM_MB"):
        SandboxSettings.from_env({"FLAGSHIP_SANDBOX_WASM_MB": "lots"})
    monkeypatch.setenv("FLAGSHIP_SANDBOX_WASM_MB", "64")
    command, _ = SandboxInterpreter(deno_dir=deno_dir)._command()
    assert "--v8-flags=--max-old-space-size=512,--wasm-max-mem-pages=1024" in command  # 64 MB / 64 KiB pages


# -- any amount of output ------------------------------------------------------

def test_pipe_tail_reads_ten_megabytes_and_keeps_the_last_64_kb() -> None:
    read_end, write_end = os.pipe()
    tail = PipeTail(os.fdopen(read_end, "rb"))
    payload = b"a" * (TEN_MB - 3) + b"end"

    def write() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(30)
    assert tail.wait(30) and not writer.is_alive()
    assert tail.total_bytes == TEN_MB
    assert tail.text() == payload[-tail_bytes:].decode()


FLOODS = {
    "python_stderr": "import sys\nsys.__stderr__.write('e' * N)\nsys.__stderr__.flush()",
    "fd_2": "import os\nview = memoryview(b'f' * N)\nwhile view:\n    view = view[os.write(2, view):]",
    "js_console_error": "import js\njs.console.error('g' * N)",
    "python_stdout": "import sys\nsys.__stdout__.write('not json\\n' * (N // 9))\nsys.__stdout__.flush()",
    "fd_1": "import os\nview = memoryview(b'{h\\n' * (N // 3))\nwhile view:\n    view = view[os.write(1, view):]",
}


@pytest.mark.parametrize("name", sorted(FLOODS))
def test_ten_megabytes_of_raw_output_finish_promptly_and_the_sandbox_carries_on(
    interp: SandboxInterpreter, name: str
) -> None:
    """Each used to block on a full stderr pipe until the limit, or break the protocol on stdout."""
    started = time.monotonic()
    output = interp.execute(FLOODS[name] + "\nprint('done')", {"N": TEN_MB})
    elapsed_s = time.monotonic() - started
    assert output.strip() == "done"
    assert elapsed_s < GENEROUS_TIMEOUT_S / 2, f"{elapsed_s:.1f} s: the output blocked"
    assert interp.alive
    assert len(interp.stderr_tail.encode()) <= tail_bytes  # bounded whatever was written
    assert interp.execute("print(6 * 7)").strip() == "42"


# -- bounded WebAssembly memory ------------------------------------------------

def test_allocating_past_the_webassembly_cap_is_a_memory_error_and_the_sandbox_carries_on(
    interp: SandboxInterpreter,
) -> None:
    heap = "import pyodide_js\nprint(pyodide_js._module.HEAP8.length // 2**20)"
    with pytest.raises(CodeExecutionError, match="MemoryError"):
        interp.execute(f"blob = bytearray({2 * WASM_MB} * 2**20)")
    assert interp.alive
    assert int(interp.execute(heap)) <= WASM_MB
    assert interp.execute(f"blob = bytearray({WASM_MB // 4} * 2**20)\nprint(len(blob) // 2**20)").strip() == str(
        WASM_MB // 4
    )
    assert int(interp.execute(heap)) <= WASM_MB


# -- terminal failures ---------------------------------------------------------

def test_a_crash_is_sandbox_crashed_quoting_stderr_then_the_session_stays_ended(deno_dir: Path) -> None:
    doomed = SandboxInterpreter(execute_timeout_s=GENEROUS_TIMEOUT_S, deno_dir=deno_dir)
    try:
        with pytest.raises(SandboxCrashed) as crashed:
            doomed.execute("import os, js\nos.write(2, b'last words before exit')\njs.Deno.exit(3)")
        assert isinstance(crashed.value, CodeInterpreterError) and not isinstance(crashed.value, CodeExecutionError)
        assert "last words before exit" in crashed.value.reason
        assert not doomed.alive
        for again in (doomed.start, lambda: doomed.execute("print(1)")):
            with pytest.raises(SandboxClosed, match="crashed"):
                again()
    finally:
        doomed.shutdown()


def _rlm(made: list[SandboxInterpreter], deno_dir: Path, **limits: Any) -> dspy.RLM:
    """An RLM whose interpreters (one per call) are recorded in ``made``."""
    def factory() -> SandboxInterpreter:
        made.append(SandboxInterpreter(deno_dir=deno_dir, **limits))
        return made[-1]

    return dspy.RLM("context, query -> output", max_iters=4, interpreter_factory=factory)


def test_rlm_shows_a_memory_error_to_the_model_and_carries_on(deno_dir: Path) -> None:
    lm = DummyLM([
        {"reasoning": "Load everything.", "code": "```python\nblob = bytearray(512 * 2**20)\n```"},
        {"reasoning": "Too big; count instead.", "code": "```python\nn = len(context)\nprint('still here', n)\n```"},
        {"reasoning": "Done.", "code": "```python\nSUBMIT(output=f'n={n}')\n```"},
    ])
    made: list[SandboxInterpreter] = []
    with dspy.context(lm=lm):
        result = _rlm(made, deno_dir, wasm_mb=WASM_MB, execute_timeout_s=GENEROUS_TIMEOUT_S)(
            context="x" * 1000, query="How long?")
    assert result.output == "n=1000"
    assert "MemoryError" in result.trajectory[0]["output"]
    assert result.trajectory[1]["output"].strip() == "still here 1000"
    # RLM shut its interpreter down; as with DSPy's own, it does not restart.
    used = made[0]
    with pytest.raises(SandboxClosed, match="shut down"):
        used.start()
    with pytest.raises(SandboxClosed):
        used.execute("print(1)")
    dspy_own = PythonInterpreter(deno_command=["deno"])
    dspy_own.shutdown()
    with pytest.raises(CodeInterpreterError, match="session has ended"):
        dspy_own.start()


def test_rlm_ends_with_sandbox_timeout_when_code_runs_past_the_limit(deno_dir: Path) -> None:
    lm = DummyLM([{"reasoning": "Spin.", "code": "```python\nwhile True:\n    pass\n```"}])
    made: list[SandboxInterpreter] = []
    with dspy.context(lm=lm), pytest.raises(SandboxTimeout) as timed_out:
        _rlm(made, deno_dir, execute_timeout_s=5.0)(context="x", query="q")
    assert isinstance(timed_out.value, errors.SandboxTimeout) and timed_out.value.timeout_s == 5.0
    assert isinstance(timed_out.value, CodeInterpreterError)
    assert not made[0].alive
    with pytest.raises(SandboxClosed, match="ran past 5.0 s"):
        made[0].execute("print(1)")
