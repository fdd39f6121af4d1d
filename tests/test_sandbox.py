"""The Deno + Pyodide sandbox, for real: no mocks, real Deno processes.

Sandbox starts cost ~2-4 s each, so one pool and one interpreter are shared
through module-scoped fixtures; tests that break an interpreter take their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError
from dspy.utils import DummyLM

from routing.errors import CodeFailed, SandboxCrashed, SandboxTimeout
from tasks.sandbox.interpreter import SandboxInterpreter
from tasks.sandbox.pool import SandboxPool
from tasks.sandbox.probe import probe_sandbox
from tasks.sandbox.setup import ensure_sandbox_cache

pytestmark = pytest.mark.sandbox

#: Execute limit of the shared pool: ample for imports on a loaded machine.
EXECUTE_TIMEOUT_S = 30.0
#: The infinite-loop test's own limit: short, so it is quick.
LOOP_TIMEOUT_S = 2.0
#: A value only the test process's environment holds.
CANARY = "flagship-canary-7c1e"
REPO_ROOT = Path(__file__).resolve().parents[1]


def run(interpreter: SandboxInterpreter, code: str, variables: dict[str, Any] | None = None) -> Any:
    """``interpreter.execute``, with a failing snippet raised as ``CodeFailed``."""
    try:
        return interpreter.execute(code, variables)
    except SyntaxError as exc:
        raise CodeFailed("SyntaxError", str(exc)) from exc
    except CodeExecutionError as exc:
        error_type, _, message = str(exc).partition(": ")
        raise CodeFailed(error_type, message) from exc


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting an init that never reaps counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def deno_children() -> list[int]:
    """Live deno processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        state, ppid = rest.split()[:2]
        if name == "deno" and int(ppid) == os.getpid() and state not in {"Z", "X"}:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def deno_dir() -> Path:
    return ensure_sandbox_cache()


@pytest.fixture(scope="module")
def pool(deno_dir: Path) -> Iterator[SandboxPool]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLAGSHIP_SANDBOX_CANARY", CANARY)
        sandboxes = SandboxPool(size=1, execute_timeout_s=EXECUTE_TIMEOUT_S, deno_dir=deno_dir)
        try:
            yield sandboxes
        finally:
            sandboxes.shutdown()


@pytest.fixture(scope="module")
def interp(pool: SandboxPool) -> Iterator[SandboxInterpreter]:
    interpreter = pool.acquire()
    yield interpreter
    pool.release(interpreter)


ESCAPES = {
    "open_etc_passwd": ("print(open('/etc/passwd').read())", "FileNotFoundError"),
    "deno_read_etc_passwd": ("import js\nprint(js.Deno.readTextFileSync('/etc/passwd'))", "Requires read access"),
    "deno_write_file": ("import js\njs.Deno.writeTextFileSync('/tmp/flagship-pwned', 'x')", "Requires write access"),
    "socket_connect": ("import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)", "OSError"),
    "http_via_urllib": ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:80/')", "Error"),
    "http_via_fetch": (
        "import js\nfrom pyodide.ffi import run_sync\nrun_sync(js.fetch('http://127.0.0.1:80/'))",
        "Requires net access",
    ),
    "deno_env": ("import js\nprint(js.Deno.env.get('FLAGSHIP_SANDBOX_CANARY'))", "Requires env access"),
    "deno_env_all": ("import js\nprint(js.Deno.env.toObject())", "Requires env access"),
    "subprocess": ("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'id'])", "does not support processes"),
    "deno_command": ("import js\njs.Deno.Command.new('/bin/sh').outputSync()", "Requires run access"),
    "missing_package": ("import numpy", "ModuleNotFoundError"),
    "missing_pure_package": ("import requests", "ModuleNotFoundError"),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempt_gets_an_error_inside_the_sandbox_and_the_sandbox_carries_on(
    interp: SandboxInterpreter, name: str
) -> None:
    code, expected = ESCAPES[name]
    with pytest.raises(CodeExecutionError) as caught:
        interp.execute(code)
    assert expected in str(caught.value)
    assert interp.alive
    assert interp.execute("print(2 + 3)").strip() == "5"
    assert not Path("/tmp/flagship-pwned").exists()


def test_os_environ_in_the_sandbox_is_not_the_host_environment(interp: SandboxInterpreter) -> None:
    output = interp.execute("import os\nprint(dict(os.environ))")
    assert CANARY not in output
    assert os.environ["PATH"] not in output


def test_run_raises_code_failed_for_a_failing_snippet(interp: SandboxInterpreter) -> None:
    with pytest.raises(CodeFailed) as caught:
        run(interp, "1 / 0")
    assert caught.value.error_type == "ZeroDivisionError"
    assert run(interp, "print('still here')").strip() == "still here"


def test_infinite_loop_is_killed_within_the_limit_and_the_pool_serves_a_fresh_interpreter(
    pool: SandboxPool,
) -> None:
    looping = pool.acquire()
    looping.execute_timeout_s = LOOP_TIMEOUT_S
    pid = looping.pid
    assert pid is not None
    started = time.monotonic()
    with pytest.raises(SandboxTimeout) as caught:
        looping.execute("while True:\n    pass")
    elapsed_s = time.monotonic() - started
    assert caught.value.timeout_s == LOOP_TIMEOUT_S
    assert isinstance(caught.value, CodeInterpreterError)  # terminal, per DSPy's protocol: RLM lets it through
    assert LOOP_TIMEOUT_S <= elapsed_s < LOOP_TIMEOUT_S + 10.0  # the kill itself is immediate; slack for load
    assert not looping.alive
    assert wait_until(lambda: process_gone(pid))
    pool.release(looping)

    fresh = pool.acquire()
    try:
        assert fresh.pid != pid
        assert fresh.execute("print(sum(range(5)))").strip() == "10"
    finally:
        pool.release(fresh)


def test_deno_exiting_is_reported_as_sandbox_crashed(pool: SandboxPool) -> None:
    doomed = pool.acquire()
    try:
        with pytest.raises(SandboxCrashed) as caught:
            doomed.execute("import js\njs.Deno.exit(3)")
        assert isinstance(caught.value, CodeInterpreterError) and not isinstance(caught.value, CodeExecutionError)
        assert not doomed.alive
    finally:
        pool.release(doomed)


def test_pool_hands_out_a_different_isolated_interpreter_on_each_acquire(pool: SandboxPool) -> None:
    first, second = pool.acquire(), pool.acquire()
    try:
        assert first is not second
        assert first.pid != second.pid
        first.execute("secret = 41")
        with pytest.raises(CodeExecutionError, match="NameError"):
            second.execute("print(secret)")
    finally:
        pool.release(first)
        pool.release(second)
    stats = pool.stats()
    assert stats.acquired_total >= 2
    assert stats.started_total >= 2
    assert len(stats.acquire_wait_s) == stats.acquired_total


def test_rlm_runs_its_code_in_the_sandbox_over_a_long_context(pool: SandboxPool) -> None:
    lines = [f"2024-05-{day % 28 + 1:02d} host{day % 7} " for day in range(2400)]
    context = "\n".join(
        line + ("ERROR disk full on /var" if i % 13 == 0 else "INFO heartbeat ok") for i, line in enumerate(lines)
    )
    assert len(context) >= 50_000
    expected = context.count("disk full")
    lm = DummyLM([
        {
            "reasoning": "Count the disk-full errors in code.",
            "code": "```python\nimport sys\nn = context.count('disk full')\nprint(sys.platform, len(context), n)\n```",
        },
        {"reasoning": "The count is printed; submit it.", "code": "```python\nSUBMIT(output=f'disk full x{n}')\n```"},
    ])
    rlm = dspy.RLM("context, query -> output", max_iters=4, interpreter_factory=pool.interpreter_factory)
    with dspy.context(lm=lm):
        result = rlm(context=context, query="How often is the disk full?")

    assert result.output == f"disk full x{expected}"
    first_step = result.trajectory[0]
    assert first_step["output"].strip() == f"emscripten {len(context)} {expected}"
    assert str(expected) not in first_step["code"]  # computed in the sandbox, not written by the model


def test_no_deno_process_remains_after_pool_shutdown(deno_dir: Path) -> None:
    before = set(deno_children())
    sandboxes = SandboxPool(size=1, deno_dir=deno_dir)
    held = sandboxes.acquire()
    assert sandboxes.wait_ready(timeout_s=60)
    pids = set(deno_children()) - before
    assert held.pid in pids and len(pids) == 2
    sandboxes.shutdown()
    sandboxes.shutdown()  # idempotent
    assert wait_until(lambda: all(process_gone(pid) for pid in pids))
    assert set(deno_children()) <= before
    with pytest.raises(SandboxCrashed):
        sandboxes.acquire()


CHILD = """
import sys, time
from tasks.sandbox.interpreter import SandboxInterpreter
interpreter = SandboxInterpreter(deno_dir=sys.argv[1])
interpreter.start()
print(interpreter.pid, flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_parent_leaves_no_orphan_deno(deno_dir: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(deno_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    try:
        assert child.stdout is not None
        deno_pid = int(child.stdout.readline())
        assert not process_gone(deno_pid)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert wait_until(lambda: process_gone(deno_pid), timeout_s=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_probe_passes_here_and_explains_how_to_install_when_the_cache_is_missing(
    deno_dir: Path, tmp_path: Path
) -> None:
    ok = probe_sandbox(deno_dir=deno_dir)
    assert ok.ok, ok.reason
    missing = probe_sandbox(deno_dir=tmp_path / "empty")
    assert not missing.ok
    assert "\n" not in missing.reason
    assert "pip install deno" in missing.reason and "python -m tasks.sandbox.setup" in missing.reason


def test_ensure_sandbox_cache_is_fast_once_filled(deno_dir: Path) -> None:
    started = time.monotonic()
    assert ensure_sandbox_cache(deno_dir) == deno_dir
    assert time.monotonic() - started < 0.5
