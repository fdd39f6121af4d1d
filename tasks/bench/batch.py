"""`flagship bench batch`: batched calls, waiting cost, and one program over a dataset across the fleet.

Three measurements, each against its baseline in the same run:

- ``session.map`` of no-op calls from one producer over 8 sessions, vs the same
  calls sent one message each;
- the producer's CPU while it waits on 1,000 pending calls (woken by the result
  listener, not polling);
- ``client.map`` of a ``Predict`` over 1,000 examples against an LM server that
  answers in 200 ms, vs the ideal time for the pool's total threads, and vs
  ``dspy.Evaluate``-style threads in one process (``dspy.Parallel``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from routing import Client, Pool, PoolTable, Settings, gather
from routing.pools import PoolKind
from tasks.bench.helpers.env import CpuMeter, own_server, server_pid
from tasks.bench.helpers.lm_side import MODEL, NO_KEY, SIGNATURE, TICKETS, UNCACHED, FakeServer, worker_env
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.local.stack import Stack

NOOP_POOL = Pool("batch_bench_pool", size=2, kind=PoolKind.CPU)
#: No queue timeout: the waiting benchmark keeps ~8 two-second calls queued per session on purpose.
LM_POOL = Pool("map_bench_pool", size=2, kind=PoolKind.LM, queue_timeout_s=None)


def _pools_settings(base: Settings, *pools: Pool) -> tuple[Settings, str]:
    table = PoolTable.load(base.pools_config)
    for pool in pools:
        table = table.with_pool(pool)
    return replace(base, pools_config=table.to_json()), table.to_json()


def bench_map(client: Client, sessions_n: int, calls: int, chunk_size: int, rounds: int) -> dict[str, Any]:
    sessions = [client.session(NOOP_POOL.name) for _ in range(sessions_n)]
    per_session = calls // sessions_n
    threads = ThreadPoolExecutor(sessions_n)
    try:
        def mapped() -> float:
            t = time.perf_counter()
            list(threads.map(lambda s: s.map("ping", [{}] * per_session, chunk_size=chunk_size), sessions))
            return sessions_n * per_session / (time.perf_counter() - t)

        def one_message_each(n: int) -> float:
            t = time.perf_counter()
            gather([sessions[i % sessions_n].submit("ping") for i in range(n)])
            return n / (time.perf_counter() - t)

        mapped(), one_message_each(200)  # warm-up
        map_rounds = [mapped() for _ in range(rounds)]
        single_rounds = [one_message_each(min(calls, 2000)) for _ in range(rounds)]
    finally:
        threads.shutdown()
        for s in sessions:
            s.close()
    return {"calls": sessions_n * per_session, "sessions": sessions_n, "chunk_size": chunk_size,
            "map_calls_s": statistics.median(map_rounds), "one_message_each_calls_s": statistics.median(single_rounds),
            "rounds": {"map": map_rounds, "one_message_each": single_rounds}}


def bench_waiting(client: Client, pending: int, sleep_s: float, slots: int) -> dict[str, Any]:
    """Producer CPU while ``pending`` calls are outstanding (each sleeps ``sleep_s`` on an LM-pool worker)."""
    sessions = [client.session(LM_POOL.name) for _ in range(min(pending, slots))]
    try:
        futures = [sessions[i % len(sessions)].submit("ping", sleep_s=sleep_s) for i in range(pending)]
        cpu, wall = time.process_time(), time.perf_counter()
        gather(futures, timeout_s=600)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        for s in sessions:
            s.close()
    return {"pending": pending, "wall_s": wall, "producer_cpu_s": cpu, "core_share": cpu / wall,
            "cpu_us_per_call": cpu / pending * 1e6}


def bench_fleet_map(client: Client, base_url: str, examples_n: int, delay_s: float, slots: int, rounds: int,
                    fleet_meter: CpuMeter, local_meter: CpuMeter) -> dict[str, Any]:
    """``client.map`` vs ``dspy.Parallel(num_threads=64)`` in this process, in alternating rounds (medians)."""
    import dspy

    examples = [{"ticket": TICKETS[i % len(TICKETS)]} for i in range(examples_n)]
    client.map(LM_POOL.name, SIGNATURE, examples[:slots], progress=False)  # warm-up: LMs, HTTP clients
    lm = dspy.LM(MODEL, api_base=base_url, api_key=NO_KEY, cache=False, temperature=0.0, max_tokens=4000)
    program = dspy.Predict(SIGNATURE)
    parallel = dspy.Parallel(num_threads=64, disable_progress_bar=True)
    dataset = [(program, dspy.Example(**e).with_inputs("ticket")) for e in examples]
    with dspy.context(lm=lm):
        parallel(dataset[:slots])  # warm-up: the LM's HTTP client, 64 threads
    fleet_rounds: list[dict[str, Any]] = []
    local_rounds: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}

    def fleet_round() -> None:
        nonlocal summary
        fleet_meter.start()
        fleet = client.map(LM_POOL.name, SIGNATURE, examples, progress=False)
        fleet_rounds.append(_cpu_round(fleet.elapsed_s, fleet_meter.stop(), examples_n))
        summary = fleet.summary()

    def local_round() -> None:
        with dspy.context(lm=lm):
            local_meter.start()
            t = time.perf_counter()
            parallel(dataset)
            local_rounds.append(_cpu_round(time.perf_counter() - t, local_meter.stop(), examples_n))

    for i in range(rounds):  # alternating, each side first in every other round
        for side in ((fleet_round, local_round) if i % 2 == 0 else (local_round, fleet_round)):
            side()
    fleet_s = statistics.median(r["wall_s"] for r in fleet_rounds)
    in_process_s = statistics.median(r["wall_s"] for r in local_rounds)
    ideal_s = math.ceil(examples_n / slots) * delay_s
    return {"examples": examples_n, "delay_s": delay_s, "pool_slots": slots, "fleet_s": fleet_s,
            "ideal_s": ideal_s, "ratio_to_ideal": fleet_s / ideal_s,
            "dspy_parallel_64_threads_s": in_process_s, "ratio_to_dspy_parallel": fleet_s / in_process_s,
            "rounds": {"fleet": fleet_rounds, "dspy_parallel": local_rounds}, "summary": summary}


def _cpu_round(wall_s: float, cpu_s: dict[str, float], calls: int) -> dict[str, Any]:
    return {"wall_s": wall_s, "cpu_ms_per_call": {k: round(v * 1000 / calls, 3) for k, v in cpu_s.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        return _run(args, base)


def _run(args: argparse.Namespace, base: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {}
    settings, table = _pools_settings(base, NOOP_POOL, LM_POOL)
    with FakeServer(args.delay_s) as server:
        env = worker_env(table, server.base_url, **UNCACHED)  # every call reaches the LM server
        with Stack(settings, env=env, loglevel="warning") as stack:
            procs = stack.start_pools(pools=[NOOP_POOL.name, LM_POOL.name])
            client = Client(stack.redis_url, settings)
            try:
                report["map"] = bench_map(client, args.sessions, args.calls, args.chunk_size, args.rounds)
                slots = LM_POOL.size * LM_POOL.concurrency
                report["waiting"] = bench_waiting(client, args.pending, args.sleep_s, slots)
                lm_workers = [p.pid for p in procs if p.pool == LM_POOL.name]
                fleet_meter = CpuMeter({"producer": [os.getpid()], "workers": lm_workers,
                                        "redis": [server_pid(stack.settings)], "lm_server": [server.proc.pid]})
                local_meter = CpuMeter({"process": [os.getpid()], "lm_server": [server.proc.pid]})
                report["fleet_map"] = bench_fleet_map(client, server.base_url, args.examples, args.delay_s, slots,
                                                      args.rounds, fleet_meter, local_meter)
            finally:
                client.close()
    return report


def markdown(report: dict[str, Any]) -> str:
    m, w, f = report["map"], report["waiting"], report["fleet_map"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        [f"`session.map` of {m['calls']} no-op calls over {m['sessions']} sessions (chunks of {m['chunk_size']})",
         f"**{m['map_calls_s']:,.0f} calls/s**"],
        ["the same calls, one message each", f"{m['one_message_each_calls_s']:,.0f} calls/s"],
        ["ratio", f"{m['map_calls_s'] / m['one_message_each_calls_s']:.0f}×"],
        [f"producer CPU while waiting on {w['pending']} pending calls ({w['wall_s']:.1f} s, results included)",
         f"**{w['core_share'] * 100:.1f} % of a core** ({w['cpu_us_per_call']:.0f} µs per call)"],
        [f"`client.map` of a `Predict` over {f['examples']} examples, LM answers in {f['delay_s'] * 1000:.0f} ms, "
         f"{f['pool_slots']} threads in the pool", f"{f['fleet_s']:.2f} s"],
        ["ideal for the pool's threads (⌈examples / threads⌉ × delay)",
         f"{f['ideal_s']:.2f} s → **{f['ratio_to_ideal']:.2f}× ideal**"],
        ["`dspy.Parallel(num_threads=64)` in one process, same server",
         f"{f['dspy_parallel_64_threads_s']:.2f} s → fleet {f['ratio_to_dspy_parallel']:.2f}×"],
    ]
    shares = ", ".join(f"{node.split('@')[0]} {v['share']:.0%}" for node, v in f["summary"]["per_worker"].items())
    return (f"```bash\nflagship bench batch\n```\n\nOne run, {when} (2 shared cores; median of rounds where "
            "repeated):\n\n" + markdown_table(["", "result"], rows)
            + "\n\n`client.map` and `dspy.Parallel` rounds, alternating (wall seconds; CPU ms per example by "
            "process):\n\n" + markdown_table(["round", "`client.map`", "`dspy.Parallel(num_threads=64)`"],
                                              _round_rows(f["rounds"]))
            + f"\n\n`client.map` per-worker share: {shares}. Targets: `session.map` ≥ 20,000 calls/s "
            + ("(met)" if m["map_calls_s"] >= 20_000 else "(**not met** in this run)")
            + "; waiting < 5 % of a core " + ("(met)" if w["core_share"] < 0.05 else "(**not met**)")
            + "; `client.map` within 1.2× ideal " + ("(met)." if f["ratio_to_ideal"] <= 1.2 else "(**not met**).")
            + "\n")


def _round_rows(rounds: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    def cell(r: dict[str, Any]) -> str:
        return f"{r['wall_s']:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_call"].items()) + ")"

    return [[str(i + 1), cell(fleet), cell(local)]
            for i, (fleet, local) in enumerate(zip(rounds["fleet"], rounds["dspy_parallel"], strict=True))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench batch")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--calls", type=int, default=160_000, help="no-op calls for session.map, all sessions")
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pending", type=int, default=1000, help="calls outstanding while the producer waits")
    parser.add_argument("--sleep-s", type=float, default=2.0, help="how long each of them runs on its worker")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--delay-s", type=float, default=0.2, help="the fake LM server's answer time")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="replace the `batch` section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args)
    if args.write_docs:
        update_section("batch", markdown(report))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
