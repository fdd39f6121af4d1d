"""DSPy's Deno + Pyodide interpreter, locked down and with a clock.

``SandboxInterpreter`` keeps DSPy's JSON-RPC protocol and runner.js (it
subclasses ``PythonInterpreter``) and changes how the Deno process is started
and watched:

* ``--cached-only`` with the project's DENO_DIR and import map: no network, not
  even to load Pyodide; ``--allow-read`` of the Pyodide package only, revoked by
  runner.js once Pyodide is loaded; no write, env, net, run or FFI permission,
  ``--no-prompt``, and an almost empty process environment;
* ``--v8-flags``: ``--max-old-space-size`` caps the JS heap and
  ``--wasm-max-mem-pages`` the WebAssembly memory Pyodide's Python heap lives in
  (code past it gets ``MemoryError``, a code error; the sandbox carries on);
* a wall-clock limit on every ``execute`` that kills the process group;
* stderr drained by a thread (any amount; the last 64 KB kept for crash
  reports); Python's raw stdout and stderr go there too (``pyodide_shim.js``),
  so stdout carries only the JSON-RPC protocol;
* failures per DSPy's ``CodeInterpreter`` protocol, as typed errors
  (:mod:`tasks.sandbox.errors`);
* the child gets SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError
from dspy.primitives.python_interpreter import PythonInterpreter

from routing.errors import SandboxError
from tasks.sandbox.drain import PipeTail
from tasks.sandbox.errors import InterpreterFailure, SandboxClosed, SandboxCrashed, SandboxTimeout
from tasks.sandbox.paths import INSTALL_HINT, sandbox_paths
from tasks.sandbox.process import Watchdog, kill_process_group, spawn
from tasks.sandbox.settings import SandboxSettings

__all__ = ["SandboxInterpreter"]

log = logging.getLogger(__name__)

#: Default wall-clock limit of one ``execute``.
default_execute_timeout_s = 30.0
#: Default limit for starting Deno and loading Pyodide (~2-4 s when warm).
default_start_timeout_s = 60.0
#: Default cap of the V8 (JS) heap. Pyodide's WebAssembly memory is outside it.
default_heap_mb = 512
#: WebAssembly memory comes in pages of 64 KiB.
_WASM_PAGES_PER_MB = 16
#: Characters of stderr a crash report quotes.
_CRASH_STDERR_CHARS = 1000


class SandboxInterpreter(PythonInterpreter):
    """A DSPy ``CodeInterpreter`` running Python in a locked-down Deno + Pyodide process.

    Lifecycle (DSPy's ``CodeInterpreter`` protocol):
        1. ``SandboxInterpreter(...)`` only stores configuration.
        2. ``start()`` spawns Deno, loads Pyodide and runs a health check within
           ``start_timeout_s``; idempotent. ``execute`` starts lazily if needed.
        3. ``execute(code, variables)`` runs code; state persists between calls.
           Outcomes:
             - output (``str``), or ``FinalOutput`` when the code called SUBMIT;
             - the code failed, carry on: ``CodeExecutionError`` / ``SyntaxError``
               (what DSPy's RLM turns into an ``[Error] ...`` line for the model),
               ``MemoryError`` past ``wasm_mb`` included;
             - the interpreter is dead, replace it (terminal ``CodeInterpreterError``
               subclasses, which RLM lets through): ``SandboxTimeout`` when the
               code ran past ``execute_timeout_s`` (the process was killed), or
               ``SandboxCrashed`` when Deno exited or broke the protocol;
             - a bare ``CodeInterpreterError`` for host-side setup errors (e.g. a
               bad variable name), as DSPy raises them; the sandbox is fine.
           Time spent in host-side tools (``llm_query``) does not count against
           the limit: the clock measures the sandbox's own work.
        4. ``shutdown()`` kills the process; idempotent. As in DSPy, a session
           never restarts: ``start()`` / ``execute()`` afterwards (or after a
           crash or timeout) raise ``SandboxClosed``. Create a new interpreter
           (or take one from ``SandboxPool``).

    One thread drives one interpreter (DSPy enforces this in ``execute``).
    """

    execution_instructions = (
        "Python runs in Pyodide/WebAssembly. State persists across executions, but subprocesses and native "
        "extensions are unavailable. Python standard libraries such as re, json, collections, and math are "
        "available; other packages cannot be installed. There is no host filesystem, environment or network "
        "access. Each execution has a wall-clock limit; code that runs past it is killed and ends the run."
    )

    def __init__(
        self,
        *,
        execute_timeout_s: float = default_execute_timeout_s,
        start_timeout_s: float = default_start_timeout_s,
        heap_mb: int = default_heap_mb,
        wasm_mb: int | None = None,
        deno_dir: Path | None = None,
        tools: dict[str, Any] | None = None,
        output_fields: list[dict] | None = None,
    ) -> None:
        # A placeholder command keeps DSPy from probing Deno here; the real one
        # is built in _spawn_process, so construction allocates nothing.
        super().__init__(deno_command=["deno"], tools=tools, output_fields=output_fields)
        self.execute_timeout_s = execute_timeout_s
        self.start_timeout_s = start_timeout_s
        self.heap_mb = heap_mb
        #: WebAssembly memory cap; None: ``FLAGSHIP_SANDBOX_WASM_MB`` (default 512).
        self.wasm_mb = SandboxSettings.from_env().wasm_mb if wasm_mb is None else wasm_mb
        self._deno_dir = deno_dir
        self._watchdog = Watchdog(self._kill)
        self._stderr: PipeTail | None = None
        self._ended_by: str | None = None  # why the session ended, for SandboxClosed

    # -- lifecycle -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The Deno process id while it runs."""
        process = self.deno_process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def alive(self) -> bool:
        return not self._session_ended and self.pid is not None

    def start(self) -> None:
        self._check_open()
        try:
            super().start()
        except (CodeInterpreterError, SandboxError, OSError) as exc:
            if self._watchdog.fired:
                raise self._crashed(f"sandbox did not start within {self.start_timeout_s} s") from exc
            raise self._crashed(_one_line(exc)) from exc

    def execute(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        self._check_open()
        if self.deno_process is None:
            self.start()  # under the start limit, before the execute clock runs
        self._watchdog.arm(self.execute_timeout_s)
        try:
            result = super().execute(code, variables)
        except InterpreterFailure:
            raise
        except (CodeExecutionError, SyntaxError):
            if self._watchdog.fired:
                raise self._timed_out() from None
            raise
        except CodeInterpreterError as exc:
            if self._watchdog.fired:
                raise self._timed_out() from exc
            if not self._session_ended:
                raise  # host-side setup error (e.g. a bad variable name); the sandbox is fine
            raise self._crashed(_one_line(exc)) from exc
        finally:
            self._watchdog.disarm()
        if self._watchdog.fired:
            raise self._timed_out()
        return result

    def invoke_tool(self, tool_name: str, kwargs: dict[str, Any]) -> Any:
        self._watchdog.pause()
        try:
            return super().invoke_tool(tool_name, kwargs)
        finally:
            self._watchdog.resume()

    @property
    def stderr_tail(self) -> str:
        """The end of what the sandbox wrote to stderr (at most 64 KB)."""
        return self._stderr.text() if self._stderr is not None else ""

    def shutdown(self) -> None:
        """Kill Deno at once: there is nothing to flush (no write permission)."""
        self._session_ended = True
        self._ended_by = self._ended_by or "it was shut down"
        self._watchdog.disarm()
        self._kill()
        process, self.deno_process = self.deno_process, None
        if process is not None:
            for stream in (process.stdin, process.stdout, process.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._owner_thread = None

    # -- failures ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._session_ended:
            raise SandboxClosed(f"this interpreter ended ({self._ended_by or 'it failed'}); create a new one")

    def _end(self, reason: str) -> None:
        self._ended_by = self._ended_by or reason
        self.shutdown()

    def _timed_out(self) -> SandboxTimeout:
        self._end(f"its code ran past {self.execute_timeout_s} s")
        return SandboxTimeout(self.execute_timeout_s)

    def _crashed(self, reason: str) -> SandboxCrashed:
        """End the session; the error quotes the end of Deno's stderr (V8 and Pyodide report fatal errors there)."""
        self._end("it crashed")
        if self._stderr is not None and self._stderr.wait(1.0):
            stderr = " ".join(self._stderr.text().split())[-_CRASH_STDERR_CHARS:]
            if stderr and stderr not in reason:
                reason = f"{reason}; stderr: {stderr}"
        return SandboxCrashed(reason)

    # -- process -------------------------------------------------------------

    def _command(self) -> tuple[list[str], dict[str, str]]:
        paths = sandbox_paths(self._deno_dir)
        if paths.pyodide_dir is None:
            raise SandboxError(f"Pyodide is not in the sandbox cache {paths.deno_dir}; {INSTALL_HINT}")
        pyodide_dir = str(paths.pyodide_dir)
        command = [
            paths.deno_bin, "run", "--cached-only", "--no-prompt", "--no-config", "--no-lock",
            "--node-modules-dir=false", f"--import-map={paths.import_map}",
            f"--v8-flags=--max-old-space-size={int(self.heap_mb)},"
            f"--wasm-max-mem-pages={int(self.wasm_mb) * _WASM_PAGES_PER_MB}",
            f"--allow-read={pyodide_dir}",
            str(paths.runner),
            "",  # runner.js: names of env vars to copy into Python (none)
            f"--dspy-deno-dir={pyodide_dir}",  # runner.js revokes this read grant once Pyodide is loaded
        ]
        env = {"DENO_DIR": str(paths.deno_dir), "DENO_NO_PACKAGE_JSON": "1", "DENO_NO_UPDATE_CHECK": "1",
               "NO_COLOR": "1"}
        return command, env

    def _spawn_process(self) -> None:
        command, env = self._command()
        self.deno_command = command
        try:
            process = spawn(command, env)
        except OSError as exc:
            raise SandboxError(f"cannot run {command[0]!r} ({exc}); {INSTALL_HINT}") from exc
        assert process.stderr is not None
        self._stderr = PipeTail(process.stderr)
        process.stderr = None  # the drain thread owns it (DSPy would read it on exit)
        self.deno_process = process
        log.debug("sandbox started, pid %s", process.pid)
        self._watchdog.arm(self.start_timeout_s)
        try:
            self._health_check()
        finally:
            self._watchdog.disarm()

    def _kill(self) -> None:
        process = self.deno_process
        if process is not None:
            kill_process_group(process)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:2000] or type(exc).__name__
