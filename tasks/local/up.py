"""`flagship up`: the server and every pool's workers in the foreground, until Ctrl-C or SIGTERM.

On the way out it stops what it started and says so: each worker (SIGTERM, Celery's warm shutdown),
then the embedded Valkey server, unless that was running before (or ``--keep-server``, or ``REDIS_URL``).
"""

from __future__ import annotations

import signal
import time
from types import FrameType

from routing.broker.embedded import read_record, stop_server
from routing.settings import Settings, redact_url
from tasks.local.stack import Stack, example_programs_env

#: How often the foreground loop checks that its workers still run.
check_interval_s = 0.5


def say(line: str) -> None:
    print(line, flush=True)  # flushed: `flagship up` is often piped to a log or a supervisor


def server_kept(settings: Settings, keep_server: bool) -> str | None:
    """Why the server must outlive this run (None: it is ours to stop)."""
    if settings.redis_url:
        return "REDIS_URL is set: not ours"
    record = read_record(settings.home)
    if record is not None:
        return f"it was running before `flagship up` (pid {record.pid})"
    return "--keep-server" if keep_server else None


def run_up(per_pool: int | None = None, keep_server: bool = False) -> int:
    settings = Settings.from_env()
    kept = server_kept(settings, keep_server)
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not received:  # the first one stops the run; later ones only wait for the stop to finish
            received.append(signal.Signals(signum).name)
            raise KeyboardInterrupt
        say(f"{signal.Signals(signum).name}: still stopping, please wait")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    stack: Stack | None = None
    try:
        stack = Stack(settings, env=example_programs_env())  # the demo's triage program, beside the user's own
        say(f"server: {redact_url(stack.redis_url)}")
        for pool in stack.pools:
            if pool.broker:  # a pool on its own broker: its workers go there (the server must be running)
                say(f"server of {pool.name}: {redact_url(stack.broker_of(pool.name))}")
        serving = stack.start_pools(per_pool=per_pool)
        for worker in stack.workers:
            state = "serving" if worker in serving else "REFUSED (see its log)"
            say(f"worker {worker.node} ({worker.pool}) pid {worker.pid} {state}; log {worker.log_path}")
        say("stack is up; Ctrl-C stops it" + ("" if kept else " and the server"))
        while all(w.alive() for w in serving):
            time.sleep(check_interval_s)
        say("a worker exited: stopping the stack")
    except KeyboardInterrupt:
        say(f"{received[0] if received else 'SIGINT'}: stopping what `flagship up` started")
    finally:
        if stack is not None:
            shut_down(stack, settings, kept)
        elif not kept and stop_server(settings.home):  # stopped while the server was starting
            say("stopped the embedded server")
    return 0


def shut_down(stack: Stack, settings: Settings, kept: str | None) -> None:
    """Stop the workers, then the embedded server unless ``kept`` says why not; one line for each."""
    workers = list(stack.workers)
    stack.stop()
    for worker in workers:
        killed = " (killed: it did not finish its warm shutdown in time)" if worker.proc.returncode == -9 else ""
        say(f"stopped worker {worker.node} (pid {worker.pid}){killed}")
    if kept:
        say(f"left the server running at {redact_url(stack.redis_url)} ({kept})")
        return
    record = read_record(settings.home)
    if stop_server(settings.home):
        say(f"stopped the embedded server (pid {record.pid if record else '?'}, {redact_url(stack.redis_url)})")
