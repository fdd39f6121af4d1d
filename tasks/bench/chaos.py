"""`flagship bench chaos --minutes N`: calls over strict and hint sessions while workers are killed -9.

Closed-loop users (one thread per session, a few calls in flight each) call
``record``, which appends each execution (task id, marker) to a Redis list; a
chaos thread kills a random worker with ``kill -9`` at random moments, preferring
one that is busy (calls being popped), and restarts it under the same node name.
Strict sessions rehydrate; hint sessions rely on the producer's sweep
(``routing/producer/recovery/sweep.py``). At the end: sent, completed, typed errors by
type, untyped errors, lost (not settled within the bound), duplicate executions
(per task id, against the reruns the workers counted), p99 settle time.
The chaos test (tests/reliability/test_chaos.py) runs the same, shorter.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from routing import Client, Pool, PoolTable, Session, names
from routing.errors import FlagshipError
from routing.pools import Affinity
from routing.producer.future import CallFuture
from routing.settings import Settings
from tasks.bench.helpers.env import own_server
from tasks.bench.helpers.report import DOC, markdown_table, update_section
from tasks.local.stack import Stack, WorkerProcess

STRICT_POOL = Pool("chaos_strict_pool", Affinity.STRICT_QUEUE, size=2, concurrency=4, queue_timeout_s=None)
HINT_POOL = Pool("chaos_hint_pool", Affinity.HINT, size=2, concurrency=4)
#: System counters (``names.STATS_KEY``) the report shows, as deltas over the run.
STATS = ("reruns", "answered_from_store", "resent", "orphans_requeued", "dead_lettered")


@dataclass
class Tally:
    """Every call's fate; filled by the users' threads."""

    sent: int = 0
    completed: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    untyped: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    settle_s: list[float] = field(default_factory=list)
    markers: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self, future: CallFuture, bound_s: float) -> None:
        try:
            future.result(max(0.0, future.submitted_at + bound_s - time.monotonic()))
        except FlagshipError as exc:
            if not future.done():  # CallTimeout: not settled within the bound
                with self.lock:
                    self.lost.append(future.id)
                return
            self._count(future, typed=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001  (an untyped error is what this counts)
            self._count(future, untyped=type(exc).__name__)
        else:
            self._count(future, completed=True)

    def _count(self, future: CallFuture, typed: str = "", untyped: str = "", completed: bool = False) -> None:
        with self.lock:
            self.settle_s.append((future.completed_at or time.monotonic()) - future.submitted_at)
            self.completed += completed
            if completed:
                self.markers.add(future.kwargs["marker"])
            if typed:
                self.typed[typed] += 1
            if untyped:
                self.untyped[untyped] += 1


@dataclass
class Chaos:
    """One chaos run over a strict and a hint pool whose workers ``workers`` lists (restarts replace them)."""

    stack: Stack
    client: Client
    workers: dict[str, list[WorkerProcess]]
    sessions_per_pool: int = 6
    in_flight_per_session: int = 4
    #: Longest a call may take to settle (a call past it counts as lost).
    settle_bound_s: float = 60.0
    #: Random gap between kills, seconds.
    kill_gap_s: tuple[float, float] = (1.0, 4.0)
    seed: int | None = None
    tally: Tally = field(default_factory=Tally)
    kills: int = 0
    #: Each kill: the node, and whether it was busy (running calls with more queued) when killed.
    kill_log: list[dict[str, Any]] = field(default_factory=list)
    #: What went wrong killing or restarting workers (the run goes on without that worker).
    chaos_errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    rehydrations: int = 0

    def run(self, seconds: float, min_calls: int = 0, min_kills: int = 0, max_seconds: float | None = None
            ) -> dict[str, Any]:
        """Load and kills for ``seconds`` (longer until ``min_calls`` and ``min_kills``, up to ``max_seconds``)."""
        rng = random.Random(self.seed)
        redis = self.client.redis
        redis.delete(names.EXECUTIONS_KEY)
        before = self._stats()
        opened = [self.client.session(STRICT_POOL.name, rehydrate=True) for _ in range(self.sessions_per_pool)]
        opened += [self.client.session(HINT_POOL.name) for _ in range(self.sessions_per_pool)]
        users = [threading.Thread(target=self._user, args=(s,), daemon=True) for s in opened]
        killer = threading.Thread(target=self._killer, args=(rng,), daemon=True)
        started = time.monotonic()
        for thread in [*users, killer]:
            thread.start()
        limit = started + (max_seconds or seconds)
        while time.monotonic() < limit and not (time.monotonic() - started >= seconds
                                                and self.tally.sent >= min_calls and self.kills >= min_kills):
            time.sleep(0.2)
        self.stop.set()
        for thread in [*users, killer]:
            thread.join(self.settle_bound_s + 30)
        wall_s = time.monotonic() - started
        self.rehydrations = sum(s.rehydrations for s in opened)
        for session in opened:
            try:
                session.close()
            except FlagshipError:
                pass
        return self.report(before, wall_s)

    def _user(self, session: Session) -> None:
        outstanding: list[CallFuture] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            marker = f"{session.id[:8]}-{n}"
            try:
                outstanding.append(session.submit("record", marker=marker, sleep_s=random.choice((0, 0, 0.01, 0.05))))
            except FlagshipError as exc:
                with self.tally.lock:
                    self.tally.typed[type(exc).__name__] += 1
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001
                with self.tally.lock:
                    self.tally.untyped[type(exc).__name__] += 1
            with self.tally.lock:
                self.tally.sent += 1
            if len(outstanding) >= self.in_flight_per_session:
                self.tally.settle(outstanding.pop(0), self.settle_bound_s)
        for future in outstanding:
            self.tally.settle(future, self.settle_bound_s)

    def _killer(self, rng: random.Random) -> None:
        pools = [STRICT_POOL.name, HINT_POOL.name]
        while not self.stop.wait(rng.uniform(*self.kill_gap_s)):
            pool = pools[self.kills % 2]
            try:
                victim = rng.choice([w for w in self.workers[pool] if w.alive()])
                busy = self._wait_busy(victim, deadline=time.monotonic() + 2.0)
                victim.kill()
                self.kills += 1
                self.kill_log.append({"node": victim.node.split("@")[0], "busy": busy})
                reborn = self.stack.start_worker(pool, victim.node, wait=False)
                self.workers[pool] = [reborn if w is victim else w for w in self.workers[pool]]
                self.stack.wait_ready([reborn])
            except Exception as exc:  # noqa: BLE001  (reported; the load goes on)
                self.chaos_errors.append(repr(exc)[:300])

    def _wait_busy(self, worker: WorkerProcess, deadline: float) -> bool:
        """Until ``worker`` runs calls and has more waiting (it is popping): False if not by the deadline."""
        redis = self.client.redis
        while time.monotonic() < deadline:
            in_flight = int(redis.hget(names.worker_key(worker.node), "in_flight") or 0)
            if in_flight and (redis.llen(names.pool_queue(worker.pool)) or redis.llen(names.worker_queue(worker.node))):
                return True
            time.sleep(0.01)
        return False

    def _stats(self) -> dict[str, int]:
        values = self.client.redis.hmget(names.STATS_KEY, list(STATS))
        return {name: int(v or 0) for name, v in zip(STATS, values)}

    def report(self, before: dict[str, int], wall_s: float) -> dict[str, Any]:
        entries = [json.loads(raw) for raw in self.client.redis.lrange(names.EXECUTIONS_KEY, 0, -1)]
        reruns = self.client.redis.zrange(names.RERUNS_KEY, 0, -1)
        per_task = Counter(e["task_id"] for e in entries)
        tasks_per_marker: dict[str, set[str]] = {}
        for e in entries:
            tasks_per_marker.setdefault(e["marker"], set()).add(e["task_id"])
        after = self._stats()
        settle = sorted(self.tally.settle_s)
        tally = self.tally
        return {
            "wall_s": round(wall_s, 1), "kills": self.kills, "kill_log": self.kill_log,
            "chaos_errors": self.chaos_errors, "rehydrations": self.rehydrations,
            "sent": tally.sent, "completed": tally.completed,
            "typed_errors": dict(tally.typed), "untyped_errors": dict(tally.untyped), "lost": len(tally.lost),
            "lost_ids": tally.lost[:10],
            "completed_without_execution": len(tally.markers - set(tasks_per_marker)),
            "executions": len(entries),
            "duplicate_executions": sum(n - 1 for n in per_task.values()),
            # A task id that ran twice must be one a worker counted as a rerun (0 here, or the accounting lies).
            "uncounted_duplicates": len({t for t, n in per_task.items() if n > 1} - set(reruns)),
            "rehydration_reruns": sum(len(ids) - 1 for ids in tasks_per_marker.values()),
            "system": {name: after[name] - before[name] for name in STATS},
            "p99_settle_s": round(settle[int(0.99 * (len(settle) - 1))], 3) if settle else None,
            "max_settle_s": round(settle[-1], 3) if settle else None,
        }


def render(report: dict[str, Any]) -> str:
    typed = ", ".join(f"{k} {v}" for k, v in sorted(report["typed_errors"].items())) or "none"
    system = report["system"]
    return "\n".join([
        f"chaos: {report['wall_s']} s, {report['kills']} kill -9 (restarted under the same name)",
        f"sent {report['sent']}  completed {report['completed']}  lost {report['lost']}  "
        f"untyped errors {sum(report['untyped_errors'].values())}",
        f"typed errors: {typed}",
        f"executions {report['executions']}: duplicate executions {report['duplicate_executions']} "
        f"(reruns counted by workers {system['reruns']}, uncounted {report['uncounted_duplicates']}); "
        f"strict reruns after rehydration "
        f"{report['rehydration_reruns']}",
        f"answered from the store {system['answered_from_store']}, resent {system['resent']}, "
        f"orphans requeued {system['orphans_requeued']}",
        f"settle time p99 {report['p99_settle_s']} s, max {report['max_settle_s']} s",
    ])


#: ``--write-docs`` rewrites the ``chaos`` section of this file.
RELIABILITY_DOC = DOC.with_name("reliability.md")


def markdown(report: dict[str, Any], command: str) -> str:
    """The run as the table ``docs/reliability.md`` shows."""
    system = report["system"]
    typed = ", ".join(f"{k} {v}" for k, v in sorted(report["typed_errors"].items())) or "none"
    rows: list[list[object]] = [
        ["wall time", f"{report['wall_s']} s"], ["kill -9 (restarted under the same name)", report["kills"]],
        ["calls sent", f"{report['sent']:,}"], ["completed", f"{report['completed']:,}"],
        ["typed errors", typed], ["untyped errors", sum(report["untyped_errors"].values())],
        ["lost", report["lost"]], ["completed without an execution", report["completed_without_execution"]],
        ["executions recorded", f"{report['executions']:,}"],
        ["duplicate executions (same task id ran twice)", report["duplicate_executions"]],
        ["reruns counted by workers (bound on duplicates)", system["reruns"]],
        ["duplicate executions not counted as reruns", report["uncounted_duplicates"]],
        ["strict reruns after rehydration (new task ids)", report["rehydration_reruns"]],
        ["answered from the store / resent / orphans requeued / dead-lettered",
         f"{system['answered_from_store']} / {system['resent']} / {system['orphans_requeued']} / "
         f"{system['dead_lettered']}"],
        ["settle time p99 / max", f"{report['p99_settle_s']} s / {report['max_settle_s']} s"],
    ]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"`{command}`, {when}, this 2-core machine:\n\n" + markdown_table(["", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench chaos")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=10, help="sessions per pool (strict and hint)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(4.0, 12.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log each death, rehydration and resend")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the chaos table in docs/reliability.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(message)s")
    with own_server(Settings.from_env()) as base:
        table = PoolTable.load(base.pools_config).with_pool(STRICT_POOL).with_pool(HINT_POOL)
        settings = replace(base, pools_config=table.to_json())
        with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack:
            started = stack.start_pools(pools=[STRICT_POOL.name, HINT_POOL.name])
            workers = {pool: [w for w in started if w.pool == pool] for pool in (STRICT_POOL.name, HINT_POOL.name)}
            client = Client(stack.redis_url, settings, pools=table)
            try:
                chaos = Chaos(stack, client, workers, sessions_per_pool=args.sessions,
                              kill_gap_s=tuple(args.kill_every), seed=args.seed)  # type: ignore[arg-type]
                report = chaos.run(args.minutes * 60)
            finally:
                client.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    if args.write_docs:
        update_section("chaos", markdown(report, f"flagship bench chaos --minutes {args.minutes:g}"), RELIABILITY_DOC)
    clean = (report["lost"] == 0 and not report["untyped_errors"] and report["completed_without_execution"] == 0
             and report["uncounted_duplicates"] == 0)
    return 0 if clean else 1
