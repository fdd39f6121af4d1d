"""Starting and stopping real worker processes (for `flagship up`, the demo, benchmarks and tests)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from routing import names
from routing.broker.brokers import broker_url, server_of
from routing.broker.connect import redis_client
from routing.broker.embedded import ensure_server
from routing.pools import PoolTable
from routing.settings import Settings
from tasks.worker.refusal import EXIT_REFUSED

log = logging.getLogger(__name__)

#: The example program package the demo's triage step runs (``examples/support_programs``).
EXAMPLE_PROGRAMS = "support_programs"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def example_programs_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``FLAGSHIP_PROGRAMS`` and ``PYTHONPATH`` with the example package added (from a checkout of the repo)."""
    env = os.environ if env is None else env
    if not (EXAMPLES_DIR / EXAMPLE_PROGRAMS).is_dir():
        return {}
    listed = [name.strip() for name in (env.get("FLAGSHIP_PROGRAMS") or "").split(",") if name.strip()]
    paths = [str(EXAMPLES_DIR), *filter(None, [env.get("PYTHONPATH")])]
    return {"FLAGSHIP_PROGRAMS": ",".join(dict.fromkeys([*listed, EXAMPLE_PROGRAMS])),
            "PYTHONPATH": os.pathsep.join(paths)}


#: How long a worker gets to register (the RLM pool's sandbox probe included).
worker_ready_timeout_s = 90.0


class WorkerStartFailed(RuntimeError):
    """A worker process exited or did not register in time (not a producer-facing error)."""


@dataclass
class WorkerProcess:
    pool: str
    node: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no clean shutdown, no deregistration."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it lingers."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Stack:
    """A Redis server (embedded unless ``REDIS_URL``) and worker processes started from here.

    A pool the table gives its own ``broker`` gets its workers on that server (which must run already).
    """

    settings: Settings = field(default_factory=Settings.from_env)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    loglevel: str = "info"
    workers: list[WorkerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis_url = ensure_server(self.settings)
        self.redis = redis_client(self.redis_url, decode_responses=True)
        self.pools = PoolTable.load(self.settings.pools_config)
        self.log_dir = self.log_dir or self.settings.home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        #: A client per broker the pool table names (the default's is ``self.redis``), made on first use.
        self._brokers: dict[tuple[object, ...], Redis] = {server_of(self.redis_url): self.redis}

    def broker_of(self, pool: str) -> str:
        """The URL of ``pool``'s broker: its own (the pool table's ``broker``), else the default."""
        return broker_url(self.pools.get(pool), self.redis_url)

    def redis_for(self, pool: str) -> Redis:
        """A client of ``pool``'s broker, where its workers register and heartbeat."""
        url = self.broker_of(pool)
        client = self._brokers.get(server_of(url))
        if client is None:
            client = self._brokers[server_of(url)] = redis_client(url, decode_responses=True)
        return client

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # Children read the pool table this stack routes by (workers of a pool go to its broker).
        pools = {"FLAGSHIP_POOLS": self.settings.pools_config} if self.settings.pools_config else {}
        env = {**os.environ, **pools, **self.env, **(extra or {})}
        env["REDIS_URL"] = self.redis_url
        env["FLAGSHIP_HOME"] = str(self.settings.home)
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        return env

    def start_worker(
        self,
        pool: str,
        name: str | None = None,
        *,
        concurrency: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        spec = self.pools.get(pool)
        node = names.qualify_node(name or f"{pool.removesuffix('_pool')}-{uuid.uuid4().hex[:6]}")
        assert self.log_dir is not None
        log_path = self.log_dir / f"{node.split('@')[0]}.log"
        cmd = [sys.executable, "-m", "tasks.cli", "worker", "--pool", spec.name, "--name", node,
               "--concurrency", str(concurrency or spec.concurrency), "--loglevel", self.loglevel]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=self.child_env(env), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        worker = WorkerProcess(spec.name, node, proc, log_path)
        self.workers.append(worker)
        if wait:
            self.wait_ready([worker])
        return worker

    def wait_ready(self, workers: list[WorkerProcess], timeout_s: float = worker_ready_timeout_s,
                   allow_refused: bool = False) -> list[WorkerProcess]:
        """Block until each worker process heartbeats; fail fast if one exits.

        With ``allow_refused``, a worker that refuses its pool (exit 78: missing
        capability, say) is returned instead of failing the start.
        """
        deadline = time.monotonic() + timeout_s
        pending, refused = list(workers), []
        while pending:
            pending = [w for w in pending if not self.registered(w)]
            for worker in list(pending):
                if worker.alive():
                    continue
                if allow_refused and worker.proc.returncode == EXIT_REFUSED:
                    pending.remove(worker)
                    refused.append(worker)
                    continue
                raise WorkerStartFailed(f"worker {worker.node} exited ({worker.proc.returncode}):\n"
                                        f"{worker.log_tail()}")
            if pending and time.monotonic() > deadline:
                raise WorkerStartFailed(f"workers {[w.node for w in pending]} did not register in {timeout_s} s")
            if pending:
                time.sleep(0.05)
        return refused

    def registered(self, worker: WorkerProcess) -> bool:
        """This process (not an earlier run under the same name) heartbeats: incarnations start with the pid."""
        incarnation = self.redis_for(worker.pool).get(names.heartbeat_key(worker.node))
        return bool(incarnation) and str(incarnation).startswith(f"{worker.pid}-")

    def start_pools(self, per_pool: int | None = None, pools: list[str] | None = None,
                    env: dict[str, str] | None = None) -> list[WorkerProcess]:
        """Start each pool's workers; returns those serving (capability refusals are logged, not fatal)."""
        started = []
        for spec in self.pools:
            if pools is not None and spec.name not in pools:
                continue
            for i in range(per_pool or spec.size):
                started.append(self.start_worker(spec.name, f"{spec.name.removesuffix('_pool')}-{i + 1}",
                                                 env=env, wait=False))
        refused = self.wait_ready(started, allow_refused=True)
        for worker in refused:
            log.warning("%s", worker.log_tail(400).strip().splitlines()[-1])
        return [w for w in started if w not in refused]

    def stop(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        for client in self._brokers.values():
            client.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
