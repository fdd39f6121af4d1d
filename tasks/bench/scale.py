"""`flagship bench scale`: throughput of 4 workers vs 2 on I/O-bound calls, both sides in every round.

Each round scales a hint pool out and back in, on a server of its own. Two workers
serve ``users`` closed-loop sessions (each sends a ``ping`` that sleeps, i.e. an
I/O-bound call, waits for it, sends the next): twice as many users as threads, so
both sides are bound by capacity, not by the producer. Then two new workers join and
as many users again open sessions on the running pool. The round's ratio is the
4-worker throughput over the 2-worker one. The 4-worker window starts the moment the
new workers are registered (no grace period), so a worker slow to take its share
shows in the ratio, and its share of the first second is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from routing import Client, Pool, PoolTable, Session
from routing.pools import Affinity
from routing.settings import Settings
from tasks.bench.helpers.env import own_server
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.local.stack import Stack, WorkerProcess

SCALE_POOL = Pool("scale_pool", Affinity.HINT, size=2, concurrency=2)


def short(node: str) -> str:
    return node.split("@")[0]


@dataclass(frozen=True)
class Done:
    at: float  # monotonic time the reply arrived (one clock: workers run on this machine)
    node: str
    started: float  # when the worker started the call
    direct: bool  # sent to the bound worker's direct queue (else the shared queue)


@dataclass
class Load:
    """Closed-loop users: one thread per session, one call in flight each."""

    sleep_s: float
    done: list[Done] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def add(self, session: Session) -> None:
        thread = threading.Thread(target=self._user, args=(session,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _user(self, session: Session) -> None:
        while not self.stop.is_set():
            try:
                future = session.submit("ping", sleep_s=self.sleep_s)
                value = future.result(60)
            except Exception as exc:  # a benchmark reports failures instead of dying on them
                self.errors.append(repr(exc))
                return
            self.done.append(Done(time.monotonic(), short(value["node"]), value["started"], future.target is not None))

    def window(self, start: float, seconds: float) -> list[Done]:
        return [d for d in list(self.done) if start <= d.at < start + seconds]

    def halt(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)


def batch(client: Client, sessions: int, per_session: int, sleep_s: float) -> dict[str, Any]:
    """Calls submitted all at once, session after session (``futures = [...]; gather``): who ran how many."""
    opened = [client.session(SCALE_POOL.name) for _ in range(sessions)]
    try:
        started = time.monotonic()
        futures = [s.submit("ping", sleep_s=sleep_s) for s in opened for _ in range(per_session)]
        ran = Counter(short(f.result(120)["node"]) for f in futures)
        return {"seconds": time.monotonic() - started, "calls": dict(sorted(ran.items()))}
    finally:
        for session in opened:
            session.close()


def one_round(stack: Stack, client: Client, users: int, sleep_s: float, seconds: float,
              warmup_s: float = 1.0) -> dict[str, Any]:
    load = Load(sleep_s)
    first = [client.session(SCALE_POOL.name) for _ in range(users)]
    second: list[Session] = []
    new: list[WorkerProcess] = []
    try:
        for session in first:
            load.add(session)
        time.sleep(warmup_s)
        start_two = time.monotonic()
        time.sleep(seconds)
        new = [stack.start_worker(SCALE_POOL.name, wait=False) for _ in range(2)]
        stack.wait_ready(new)
        start_four = time.monotonic()  # no grace period: the new workers must take their share at once
        second = [client.session(SCALE_POOL.name) for _ in range(users)]
        for session in second:
            load.add(session)
        time.sleep(seconds + 2 * sleep_s)
        load.halt()
        for session in first + second:  # idle now: the batch's sessions bind evenly
            session.close()
        time.sleep(client.router.direct_slots.hold_s)  # the closed sessions' direct slots lapse
        burst = batch(client, 8, 10, sleep_s)  # two sessions per worker, ten calls each
    finally:
        load.halt()
        for session in first + second:
            session.close()
        for worker in new:
            worker.stop()
    two, four, first_s = load.window(start_two, seconds), load.window(start_four, seconds), load.window(start_four, 1)
    per_worker, in_first_s = Counter(d.node for d in four), Counter(d.node for d in first_s)
    new_names = [short(w.node) for w in new]
    return {
        "two_workers_calls_s": len(two) / seconds,
        "four_workers_calls_s": len(four) / seconds,
        "ratio": len(four) / max(1, len(two)),
        "shares": {n: round(c / max(1, len(four)), 3) for n, c in sorted(per_worker.items())},
        "new_workers": new_names,
        "new_worker_share_min": min(per_worker[n] for n in new_names) / max(1, len(four)),
        "new_worker_first_second_share_min": min(in_first_s[n] for n in new_names) / max(1, len(first_s)),
        "new_worker_first_call_s": max(0.0, *(min((d.started - start_four for d in four if d.node == n),
                                                   default=seconds) for n in new_names)),
        "new_sessions_bound": dict(Counter(short(s.worker or "") for s in second)),
        "direct_fraction": sum(d.direct for d in four) / max(1, len(four)),
        "batch": burst,
        "errors": load.errors[:3],
    }


def run(rounds: int, users: int, sleep_s: float, seconds: float) -> dict[str, Any]:
    results = []
    with own_server(Settings.from_env()) as base:  # a server of its own: no sessions left by other runs
        table = PoolTable.load(base.pools_config).with_pool(SCALE_POOL)
        settings = replace(base, pools_config=table.to_json())
        with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack:
            stack.start_pools(pools=[SCALE_POOL.name])
            client = Client(stack.redis_url, settings, pools=table)
            try:
                for _ in range(rounds):
                    results.append(one_round(stack, client, users, sleep_s, seconds))
            finally:
                client.close()
    ratios = [r["ratio"] for r in results]
    return {
        "pool": {"affinity": SCALE_POOL.affinity.value, "concurrency": SCALE_POOL.concurrency},
        "users": {"two_workers": users, "four_workers": 2 * users},
        "sleep_s": sleep_s, "seconds": seconds, "rounds": results,
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
        "min_new_worker_share": min(r["new_worker_share_min"] for r in results),
        "errors": sum(len(r["errors"]) for r in results),
    }


FINDINGS = """\
**What made a worker fall short of its share.** Counted per round and per worker, in the closed loop and
in batches like the one above. Not session binding: sessions opened back to back landed evenly in every
round. Not stale session sets: none were left after closing (the only stale load seen was the open,
idle session of a crashed producer, which counts until its TTL). Not registration before readiness: a
new worker runs a waiting call ~10 ms after it registers. Not prefetch: one message per thread. It was
hint routing: a call went to the bound worker's direct queue whenever the producer's cached view (up to
one watch interval old, blind to the calls sent since) said "not saturated". A batch went whole into
direct queues, where no other worker can take a call, until a refresh flipped one worker to saturated;
the rest of its sessions' calls then went to the shared queue and were taken by every worker, so that
worker ran dry. Before the fix, in 5 of 18 batches one worker ran 8–17 of the 80 calls while another ran
22–27 (10–21 % vs 28–34 %: the issue's symptom); this benchmark's batch gave a new worker 8 of 80 in one
round of four. At full load the same bit read "saturated" most of the time: with as many users as
threads, 94 % of hint calls took the shared queue and sessions wandered between workers.

**Fix** (`DirectSlots` in `routing/producer/slots.py`, asked by `Router.route`): a worker serves from its
direct queue at most as many of a producer's hint sessions as it has threads; a session keeps its slot
while it keeps calling (its calls stay on one worker, in order); a session gets a free slot only if the
worker is not saturated by calls of others; every other hint call goes to the shared queue at once,
where the first free worker, a new one included, takes it. After the fix: 20 of 80 calls on every
worker in every batch measured since; with as many users as threads, 0 % through the shared queue.
"""


def markdown(report: dict[str, Any]) -> str:
    rows = [[i, f"{r['two_workers_calls_s']:.1f}", f"{r['four_workers_calls_s']:.1f}", f"**{r['ratio']:.3f}**",
             f"{100 * r['new_worker_share_min']:.1f} %", f"{100 * r['new_worker_first_second_share_min']:.1f} %",
             f"{1000 * r['new_worker_first_call_s']:.0f}",
             "–".join(str(n) for n in sorted({min(r["batch"]["calls"].values()), max(r["batch"]["calls"].values())}))
             + f" ({r['batch']['seconds']:.2f} s)"] for i, r in enumerate(report["rounds"], 1)]
    met = report["median_ratio"] >= 1.95 and report["min_ratio"] >= 1.8
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    users = report["users"]
    return (
        "```bash\nflagship bench scale            # --rounds 6 --users 8 --sleep 0.2 --seconds 8\n```\n\n"
        f"A `hint` pool of 2 workers (`-c {report['pool']['concurrency']}`), {users['two_workers']} closed-loop "
        f"users calling `ping(sleep_s={report['sleep_s']})`"
        + f"; then 2 workers join and {users['two_workers']} more "
        f"users open sessions ({users['four_workers']} in all). {report['seconds']:.0f} s measured per side, the "
        f"4-worker side from the moment the new workers registered. {when} (2 shared cores; numbers move with "
        "the other work on the machine). The batch: after the window, 8 new sessions submit 10 calls each at "
        "once (session after session), then wait for them all:\n\n"
        + markdown_table(["round", "2 workers (calls/s)", "4 workers (calls/s)", "ratio",
                          "smallest new-worker share", "its share of the first second", "new worker's first call (ms)",
                          "batch of 80: calls per worker"],
                         rows)
        + f"\n\nMedian ratio **{report['median_ratio']:.3f}**, lowest {report['min_ratio']:.3f}; target median "
        "≥ 1.95 and no round below 1.8: " + ("met" if met else "**not met**") + " in this run"
        + (f" ({report['errors']} call errors)" if report["errors"] else "") + ".\n\n" + FINDINGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench scale")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--users", type=int, default=8, help="closed-loop sessions on 2 workers (doubled on 4)")
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds each call waits (its I/O)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per side")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="replace the `scale` section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.users, args.sleep, args.seconds)
    if args.write_docs:
        update_section("scale", markdown(report))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0 if report["errors"] == 0 else 1
