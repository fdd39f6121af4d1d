"""Liveness the GIL cannot starve: a small child process renews the worker's heartbeat key.

A call that keeps every thread of a worker busy in C code holding the GIL (a
regex or JSON over a 10 MB input) can starve the heartbeat thread for longer
than the heartbeat TTL, and a live worker would be reaped. The pulse is a
separate process (its own interpreter, its own GIL) that renews the key every
heartbeat interval while its parent lives:

* the parent holds the write end of a pipe that is the pulse's stdin. When the
  parent dies, even by ``kill -9``, the pulse reads EOF at once and deletes the
  key if it still names this run (compare-and-delete), so a dead worker stops
  being live immediately instead of after the TTL;
* the parent's heartbeat thread writes a byte per beat. A pulse not fed for
  ``stall_s`` (``FLAGSHIP_STALL_S``, default 120 s) stops renewing, so a worker
  that is alive but hung does not look live forever;
* it only renews a key that still names this run: a worker reaped while cut off
  from the broker is registered again by its heartbeat thread, never by the pulse.

The child runs this file by path in isolated mode (``python -I .../pulse.py``):
it imports only the standard library and redis-py, not the ``routing`` package
(``routing/broker/connect.py``, which reads Redis and Sentinel URLs for everyone, is
loaded from its file: it imports nothing else either).
The Redis URL travels in the environment (``FLAGSHIP_PULSE_REDIS_URL``), never on
the command line, since it may hold a password. A Sentinel URL
(``sentinel://h1:26379;sentinel://h2:26379/0``) works too: the pulse asks the
sentinels for the primary (``FLAGSHIP_SENTINEL_MASTER``, ``FLAGSHIP_SENTINEL_PASSWORD``,
inherited from the worker's environment) on every new connection, so it follows a failover.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import redis as redis_lib

log = logging.getLogger(__name__)

#: Environment variable carrying the Redis URL to the pulse (it may hold a password).
URL_ENV = "FLAGSHIP_PULSE_REDIS_URL"
#: A pulse not fed by its worker's heartbeat thread for this long stops renewing (``FLAGSHIP_STALL_S``).
default_stall_s = 120.0
#: How long a stopping pulse gets to delete its key and exit before it is killed.
stop_timeout_s = 5.0

_SCRIPTS = Path(__file__).resolve().parents[1] / "broker" / "scripts"
#: The name ``routing/broker/connect.py`` is loaded under in the pulse process.
_CONNECT_MODULE = "flagship_pulse_connect"


class Pulse:
    """The parent's side: starts the pulse process, feeds it, stops it (thread-safe)."""

    def __init__(self, redis_url: str, key: str, incarnation: str, *, ttl_s: float, interval_s: float,
                 stall_s: float) -> None:
        self.redis_url = redis_url
        self.key = key
        self.incarnation = incarnation
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.stall_s = stall_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._feed_fd: int | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()  # neither end is inherited by other children (PEP 446)
        os.set_blocking(write_fd, False)
        argv = [sys.executable, "-I", str(Path(__file__).resolve()), "--key", self.key,
                "--incarnation", self.incarnation, "--ttl-ms", str(max(1, int(self.ttl_s * 1000))),
                "--interval-s", str(self.interval_s), "--stall-s", str(self.stall_s)]
        try:
            self.proc = subprocess.Popen(argv, stdin=read_fd, stdout=subprocess.DEVNULL,
                                         env={**os.environ, URL_ENV: self.redis_url})
        finally:
            os.close(read_fd)
        self._feed_fd = write_fd

    def feed(self) -> None:
        """One beat of the heartbeat thread: the worker is not hung. Restarts a pulse that died."""
        with self._lock:
            if self._stopped or self.proc is None:
                return
            if self.proc.poll() is not None or self._feed_fd is None:
                log.warning("liveness pulse of %s exited (%s); starting another", self.key, self.proc.returncode)
                if self._feed_fd is not None:
                    fd, self._feed_fd = self._feed_fd, None  # never left naming a closed descriptor
                    os.close(fd)
                self._spawn()  # if this fails, the next beat tries again
            assert self._feed_fd is not None
            try:
                os.write(self._feed_fd, b".")
            except OSError:
                pass  # a full pipe is fed already; a broken one is restarted on the next beat

    def renew_as(self, incarnation: str) -> None:
        """Pulse for a new run of the worker (it was declared dead, and came back as a new incarnation)."""
        self.stop()
        with self._lock:
            self.incarnation = incarnation
            self._stopped = False
            self._spawn()

    def stop(self) -> None:
        """Close the pipe (the pulse deletes the key if still ours and exits); kill it if it lingers."""
        with self._lock:
            self._stopped = True
            if self._feed_fd is not None:
                os.close(self._feed_fd)
                self._feed_fd = None
            proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the pulse process -----------------------------------------------------------


def _say(key: str, message: str) -> None:
    print(f"flagship pulse {key}: {message}", file=sys.stderr, flush=True)


def run(redis: redis_lib.Redis, feed_fd: int, key: str, incarnation: str, ttl_ms: int, interval_s: float,
        stall_s: float) -> None:
    """Renew ``key`` every ``interval_s`` until ``feed_fd`` reads EOF; then delete it if it is still ours."""
    renew = redis.register_script((_SCRIPTS / "renew_if_mine.lua").read_text())
    release = redis.register_script((_SCRIPTS / "delete_if_mine.lua").read_text())
    last_fed = time.monotonic()
    next_renew = 0.0
    failing: str | None = None
    stalled = False
    try:
        while True:
            readable, _, _ = select.select([feed_fd], [], [], max(0.0, next_renew - time.monotonic()))
            if readable:
                if not os.read(feed_fd, 4096):
                    return  # the worker is gone (or stopping)
                last_fed = time.monotonic()
            now = time.monotonic()
            if now < next_renew:
                continue
            next_renew = now + interval_s
            if now - last_fed > stall_s:
                if not stalled:
                    _say(key, f"worker not heard from for {stall_s:g} s (hung?): no longer renewing")
                stalled = True
                continue
            if stalled:
                _say(key, "worker beating again: renewing")
                stalled = False
            try:
                renew(keys=[key], args=[incarnation, ttl_ms])
            except redis_lib.RedisError as exc:
                if failing != str(exc):
                    _say(key, f"cannot renew ({exc}); retrying")
                failing = str(exc)
            else:
                if failing is not None:
                    _say(key, "renewing again")
                failing = None
    finally:
        try:
            release(keys=[key], args=[incarnation])
        except redis_lib.RedisError as exc:
            _say(key, f"could not delete the heartbeat on exit ({exc}); it expires with its TTL")


def _connect_module() -> ModuleType:
    """``routing/broker/connect.py`` (the one reading of Redis and Sentinel URLs), loaded from its file.

    The pulse runs isolated, without the ``routing`` package; ``connect.py`` imports only
    the standard library and redis-py, so it loads on its own.
    """
    module = sys.modules.get(_CONNECT_MODULE)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "broker" / "connect.py"
        spec = importlib.util.spec_from_file_location(_CONNECT_MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_CONNECT_MODULE] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def connect(url: str, env: Mapping[str, str], timeout_s: float) -> redis_lib.Redis:
    """A client for ``url``; for a Sentinel URL, one that always talks to the current primary."""
    connect_module = _connect_module()
    client: redis_lib.Redis = connect_module.redis_client(
        url, sentinel=connect_module.SentinelOptions.from_env(env), socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s)
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="renew a flagship worker's heartbeat while its parent lives")
    parser.add_argument("--key", required=True)
    parser.add_argument("--incarnation", required=True)
    parser.add_argument("--ttl-ms", type=int, required=True)
    parser.add_argument("--interval-s", type=float, required=True)
    parser.add_argument("--stall-s", type=float, required=True)
    args = parser.parse_args(argv)
    url = os.environ.pop(URL_ENV, "")
    if not url:
        _say(args.key, f"{URL_ENV} is not set")
        return 2
    # The worker decides when the pulse ends (by closing the pipe, or by dying). Signals sent to the whole
    # process group (Ctrl-C, systemd or honcho stopping the worker with SIGTERM) are for the worker: its warm
    # shutdown still runs calls, so its heartbeat must not vanish before it deregisters.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    timeout_s = max(0.5, min(5.0, args.ttl_ms / 2000))
    redis = connect(url, os.environ, timeout_s)
    run(redis, sys.stdin.fileno(), args.key, args.incarnation, args.ttl_ms, args.interval_s, args.stall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
