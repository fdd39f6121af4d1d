"""A newcomer's first hour: asyncio calls in order, history as a list, readable status, a clean Ctrl-C of `up`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import wait_until
from rich.console import Console

from routing import History, Session, Settings
from routing.broker.embedded import ensure_server, pid_alive, read_record, stop_server
from routing.fleet.status import fleet_snapshot
from routing.pools import PoolTable
from tasks.local.stack import Stack
from tasks.local.status_view import render_tables

ROOT = Path(__file__).resolve().parents[1]


def test_300_acalls_in_one_gather_run_in_the_order_they_were_made(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")

    async def main() -> tuple[list[dict], list[dict], dict]:
        replies = await asyncio.gather(*(session.acall("ping") for _ in range(300)))
        mapped, after = await asyncio.gather(session.amap("ping", [{}] * 4, chunk_size=1), session.acall("ping"))
        return replies, mapped, after

    replies, mapped, after = asyncio.run(main())
    assert [r["seq"] for r in replies] == list(range(1, 301))  # each call ran in its turn, none overtook another
    assert [r["seq"] for r in mapped] == [301, 302, 303, 304] and after["seq"] == 305


def test_history_is_a_list_of_entries_with_worker_complete_and_note(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    triage = session.predict("ticket -> category")
    triage(ticket="I was charged twice")
    history = session.history(n=6)
    assert isinstance(history, History) and isinstance(history, list) and len(history) == 1
    assert history[0]["model"] and history[-1]["usage"]["total_tokens"] > 0
    assert history.worker == session.worker and history.complete and history.note is None
    printed = io.StringIO()
    history.inspect(file=printed)
    assert "charged twice" in printed.getvalue() and "Response:" in printed.getvalue()


def test_flagship_status_piped_or_in_80_columns_shows_whole_names(stack: Stack,
                                                                   sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    session.call("ping")
    env = {**os.environ, "REDIS_URL": stack.redis_url, "COLUMNS": "80"}
    piped = subprocess.run([sys.executable, "-m", "tasks.cli", "status"], env=env, capture_output=True, text=True,
                           timeout=60)  # stdout is a pipe, as in `flagship status | cat`
    assert piped.returncode == 0, piped.stderr
    narrow = Console(width=80, force_terminal=True, color_system=None, record=True, file=io.StringIO())
    settings = Settings.from_env()
    data = fleet_snapshot(stack.redis_url, settings, PoolTable.load(settings.pools_config))
    render_tables({**data, "primary": "-"}, narrow)
    narrow_text = narrow.export_text()
    for text in (piped.stdout, narrow_text):
        assert "…" not in text
        lines = text.splitlines()
        for worker in [w for w in stack.workers if w.alive() and w.pool in ("triage_pool", "analytics_pool")]:
            assert any(worker.node in line for line in lines), f"{worker.node} not whole in:\n{text}"
        for pool in ("triage_pool", "analytics_pool", "rlm_pool"):
            assert any(pool in line for line in lines)
        assert any(session.id in line for line in lines)
    assert max(len(line) for line in narrow_text.splitlines()) <= 80


# -- `flagship up` and its signals ---------------------------------------------------------------------------


def one_pool_env(home: Path, **pools: object) -> dict[str, str]:
    """The test's environment with its own FLAGSHIP_HOME (so its own embedded server) and only ``pools``."""
    table: dict[str, object] = {pool.name: None for pool in PoolTable.load(os.environ.get("FLAGSHIP_POOLS"))}
    env = {**os.environ, "FLAGSHIP_HOME": str(home), "FLAGSHIP_POOLS": json.dumps({**table, **pools})}
    env.pop("REDIS_URL", None)
    return env


def start_up(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`flagship up` in a process group of its own (a terminal's Ctrl-C signals the whole group); its lines so far."""
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "up", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any(line.startswith("stack is up") for line in lines):
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"`flagship up` did not come up:\n{''.join(lines)}"
        lines.append(line)
    return proc, lines


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), recursively."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def stop_up(proc: subprocess.Popen[str], signum: int, lines: list[str]) -> str:
    os.killpg(proc.pid, signum)
    out, _ = proc.communicate(timeout=60)
    return "".join(lines) + out


@pytest.mark.timeout(240)
def test_ctrl_c_on_flagship_up_stops_its_workers_and_the_server_it_started(tmp_path: Path) -> None:
    env = one_pool_env(tmp_path, triage_pool={"size": 1, "concurrency": 2})
    proc, lines = start_up(env)
    record = read_record(tmp_path)
    assert record is not None and pid_alive(record.pid)
    children = descendants(proc.pid)
    assert children, "up started no worker"
    output = stop_up(proc, signal.SIGINT, lines)
    assert proc.returncode == 0, output
    assert "SIGINT: stopping what `flagship up` started" in output
    assert "stopped worker triage-1@" in output and f"stopped the embedded server (pid {record.pid}" in output
    wait_until(lambda: not any(pid_alive(pid) for pid in children | {record.pid}), 20)
    assert read_record(tmp_path) is None  # `flagship server status` finds no server
    status = subprocess.run([sys.executable, "-m", "tasks.cli", "server", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.stdout.strip() == "null"


@pytest.mark.timeout(120)
def test_sigterm_on_flagship_up_leaves_a_server_that_ran_before_and_keep_server_keeps_its_own(
    tmp_path: Path,
) -> None:
    before, own = tmp_path / "before", tmp_path / "own"
    ensure_server(Settings(redis_url=None, home=before))  # started by someone else, earlier
    try:
        proc, lines = start_up(one_pool_env(before))  # no pools: only the server part is under test
        output = stop_up(proc, signal.SIGTERM, lines)
        assert proc.returncode == 0 and "SIGTERM: stopping" in output
        assert "left the server running" in output and "it was running before" in output
        assert read_record(before) is not None
        proc, lines = start_up(one_pool_env(own), "--keep-server")
        output = stop_up(proc, signal.SIGINT, lines)
        assert "left the server running" in output and "(--keep-server)" in output
        assert read_record(own) is not None
    finally:
        stop_server(before)
        stop_server(own)
