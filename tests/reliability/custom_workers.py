"""Workers started with their own broker URL or extra Celery options (``Stack.start_worker`` sets neither)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from routing.names import qualify_node
from tasks.local.stack import Stack, WorkerProcess

HERE = Path(__file__).resolve().parent


def spawn_worker(stack: Stack, pool: str, name: str, *, env: dict[str, str] | None = None,
                 celery_args: tuple[str, ...] = (), concurrency: int = 2) -> WorkerProcess:
    """``flagship worker`` with ``env`` over the stack's (``REDIS_URL`` included); stopped with the stack.

    ``liveness_ops`` (this folder) is importable, for ``celery_args=["--include", "liveness_ops"]``.
    """
    node = qualify_node(name)
    child_env = stack.child_env()
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), child_env.get("PYTHONPATH")]))
    assert stack.log_dir is not None
    log_path = stack.log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "tasks.cli", "worker", "--pool", pool, "--name", node,
           "--concurrency", str(concurrency), "--loglevel", "info"]
    if celery_args:
        cmd += ["--", *celery_args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = WorkerProcess(pool, node, proc, log_path)
    stack.workers.append(worker)
    return worker


def children_of(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
