"""`flagship bench lm`: LM calls through an LM pool's workers vs ``dspy.Predict`` from threads in one process.

Both sides call the same local OpenAI-protocol server (``tasks.bench.helpers.fake_lm_server``,
its own process, answering every request after ``--delay-s``) with the same
signature, in alternating rounds: ``--sessions`` sessions (threads) of
``--per-session`` calls each, every session's calls one after another.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from routing import Client, Pool, PoolTable, Settings
from routing.pools import PoolKind
from tasks.bench.helpers.env import CpuMeter, own_server, server_pid
from tasks.bench.helpers.lm_side import (
    MODEL,
    NO_KEY,
    POOL_NAME,
    SIGNATURE,
    TICKETS,
    UNCACHED,
    FakeServer,
    _fan_out,
    _median_round,
    _round,
    adherence_case,
    cache_case,
    limiter_cpu_case,
    worker_env,
)
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.lm.dspy_caches import installed as dspy_caches_installed
from tasks.local.stack import Stack


class InProcess:
    """The baseline: plain ``dspy.Predict`` with a plain ``dspy.LM`` per thread, all in this process."""

    def __init__(self, base_url: str, sessions: int) -> None:
        import dspy

        self.dspy = dspy
        self.threads = ThreadPoolExecutor(sessions)
        self.lms = [dspy.LM(MODEL, api_base=base_url, api_key=NO_KEY, cache=False, temperature=0.0,
                            max_tokens=4000) for _ in range(sessions)]
        self.modules = [dspy.Predict(SIGNATURE) for _ in range(sessions)]
        self.calls(sessions, 1)  # warm-up, like the sessions' first calls: model metadata, HTTP clients

    def calls(self, sessions: int, per_session: int) -> float:
        def one(i: int) -> None:
            with self.dspy.context(lm=self.lms[i]):
                for k in range(per_session):
                    self.modules[i](ticket=TICKETS[(i + k) % len(TICKETS)])

        return _fan_out(self.threads, sessions, one)


def run(sessions: int = 64, per_session: int = 4, delay_s: float = 0.2, rounds: int = 3, workers: int = 2,
        concurrency: int | None = None) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        return _run(base, sessions, per_session, delay_s, rounds, workers, concurrency)


def _run(base: Settings, sessions: int, per_session: int, delay_s: float, rounds: int, workers: int,
         concurrency: int | None) -> dict[str, Any]:
    pool = Pool(POOL_NAME, size=workers, kind=PoolKind.LM, concurrency=concurrency or 0)
    table = PoolTable.load(base.pools_config).with_pool(pool)
    settings = replace(base, pools_config=table.to_json())
    calls = sessions * per_session
    with FakeServer(delay_s) as server:
        env = worker_env(table.to_json(), server.base_url, **UNCACHED)
        with Stack(settings, env=env, loglevel="warning") as stack:
            procs = stack.start_pools(pools=[POOL_NAME])
            client = Client(stack.redis_url, settings)
            threads = ThreadPoolExecutor(sessions)
            try:
                opened = [client.session(POOL_NAME) for _ in range(sessions)]
                modules = [s.predict(SIGNATURE) for s in opened]

                def flagship(per_session: int = per_session) -> float:
                    def one(i: int) -> None:
                        for k in range(per_session):
                            modules[i](ticket=TICKETS[(i + k) % len(TICKETS)], timeout_s=60)

                    return _fan_out(threads, sessions, one)

                flagship(1)  # warm-up: each session's LM is built by its first call

                local = InProcess(server.base_url, sessions)
                redis_pid = server_pid(stack.settings)
                flagship_meter = CpuMeter({"producer": [os.getpid()], "workers": [p.pid for p in procs],
                                           "redis": [redis_pid], "lm_server": [server.proc.pid]})
                local_meter = CpuMeter({"process": [os.getpid()], "lm_server": [server.proc.pid]})
                results: dict[str, list[dict[str, Any]]] = {"flagship": [], "in_process": []}
                for _ in range(rounds):  # alternating, so drift and neighbours hit both sides alike
                    results["in_process"].append(_round(local_meter, lambda: local.calls(sessions, per_session),
                                                        calls))
                    results["flagship"].append(_round(flagship_meter, flagship, calls))
                local.threads.shutdown()
                bound = sorted({s.worker or "" for s in opened})
                for s in opened:
                    s.close()
            finally:
                threads.shutdown()
                client.close()
    return _report(results, sessions, per_session, delay_s, workers, pool.concurrency, bound)


def _report(results: dict[str, list[dict[str, Any]]], sessions: int, per_session: int, delay_s: float,
            workers: int, concurrency: int, bound: list[str]) -> dict[str, Any]:
    flagship, local = _median_round(results["flagship"]), _median_round(results["in_process"])
    return {
        "calls": sessions * per_session, "sessions": sessions, "per_session": per_session, "delay_s": delay_s,
        "workers": workers, "worker_concurrency": concurrency, "bound_workers": len(bound),
        "flagship": flagship, "in_process": local,
        # False: the in-process side ran stock DSPy (nothing in this process installed the project's caches).
        "in_process_dspy_caches": dspy_caches_installed(),
        "wall_ratio": flagship["wall_s"] / local["wall_s"],
        "cpu_ratio": flagship["cpu_ms_per_call_total"] / local["cpu_ms_per_call_total"],
        "rounds": results,
    }


def markdown(report: dict[str, Any]) -> str:
    f, p = report["flagship"], report["in_process"]
    rows = [
        [f"flagship: {report['sessions']} sessions over {report['workers']} workers (`-c "
         f"{report['worker_concurrency']}`)", f"{f['wall_s']:.2f}", f"{f['cpu_ms_per_call_total']:.2f}",
         ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_ms_per_call"].items())],
        [f"`dspy.Predict` from {report['sessions']} threads in one process", f"{p['wall_s']:.2f}",
         f"{p['cpu_ms_per_call_total']:.2f}", ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_ms_per_call"].items())],
        ["**ratio flagship / in-process**", f"**{report['wall_ratio']:.3f}**", f"{report['cpu_ratio']:.3f}", ""],
    ]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{report['calls']} `Predict` calls ({report['sessions']} × {report['per_session']}, each session's "
            f"calls in order), server delay {report['delay_s'] * 1000:.0f} ms; median of "
            f"{len(report['rounds']['flagship'])} alternating rounds, {when} (2 shared cores):\n\n"
            + markdown_table(["", "wall (s)", "CPU ms / call", "CPU ms / call by process"], rows)
            + "\n\nTarget: wall ratio ≤ 1.0 "
            + ("(met)." if report["wall_ratio"] <= 1.0 else "(**not met** in this run).") + "\n")


def governor_run(calls: int = 300, rpm: int = 100, window_s: float = 5.0, windows: int = 3) -> dict[str, Any]:
    """The fleet cache's hit vs a ping, the limiter's CPU per request, and how closely the fleet keeps ``rpm``."""
    from tasks.bench.helpers.fake_lm_server import FakeOpenAI

    with own_server(Settings.from_env()) as base:
        pool = Pool(POOL_NAME, size=2, kind=PoolKind.LM, queue_timeout_s=None)
        table = PoolTable.load(base.pools_config).with_pool(pool)
        settings = replace(base, pools_config=table.to_json())
        with FakeOpenAI(delay_s=0.05) as server:  # in this process: it records when each request arrived
            env = worker_env(table.to_json(), server.base_url, FLAGSHIP_LM_CACHE="fleet",
                             FLAGSHIP_LM_CACHE_MEMORY_ENTRIES="1", FLAGSHIP_LM_LIMIT_WINDOW_S=str(window_s),
                             FLAGSHIP_LM_LIMITS=json.dumps({"openai/limited-model": {"rpm": rpm}}))
            with Stack(settings, env=env, loglevel="warning") as stack:
                stack.start_pools(pools=[POOL_NAME])
                client = Client(stack.redis_url, settings)
                try:
                    return {"cache": cache_case(client, POOL_NAME, server.base_url, calls),
                            "limiter_cpu": limiter_cpu_case(client.redis, 3000),
                            "adherence": adherence_case(client, POOL_NAME, server, rpm, window_s, windows)}
                finally:
                    client.close()


def governor_markdown(report: dict[str, Any]) -> str:
    c, cpu, a = report["cache"], report["limiter_cpu"], report["adherence"]
    added = cpu["limited"]["cpu_ms_per_call"] - cpu["unlimited"]["cpu_ms_per_call"]
    hit_delta = c["fleet_hit_p50_ms"] - c["ping_p50_ms"]
    rows = [
        ["`ping` round trip (p50)", f"{c['ping_p50_ms']:.2f} ms", ""],
        ["`Predict` call, cache hit in the worker's memory tier (p50)", f"{c['memory_hit_p50_ms']:.2f} ms", ""],
        ["`Predict` call, cache hit in the fleet tier (Redis) (p50)", f"{c['fleet_hit_p50_ms']:.2f} ms",
         f"+{hit_delta:.2f} ms vs ping (goal ≤ +1 ms: {'met' if hit_delta <= 1 else '**not met**'})"],
        ["gate + settle scripts per request, no limits (pause and budget checks)",
         f"{cpu['unlimited']['cpu_ms_per_call']:.3f} ms CPU", f"{cpu['unlimited']['wall_ms_per_call']:.3f} ms wall"],
        ["gate + settle scripts per request, rpm + tpm + concurrency",
         f"{cpu['limited']['cpu_ms_per_call']:.3f} ms CPU",
         f"limits add {added:.3f} ms CPU (goal ≤ 0.1 ms: {'met' if added <= 0.1 else '**not met**'})"],
        [f"rpm {a['rpm']} per {a['window_s']:.0f} s window, {a['offered']} calls offered by 64 threads",
         f"{a['per_window']} per window", f"busiest sliding window {a['busiest_sliding_window']} "
         f"(never above: {'met' if a['busiest_sliding_window'] <= a['rpm'] else '**not met**'}); "
         f"{a['used_share']:.1%} of the allowed rate used (goal ≥ 95 %: "
         f"{'met' if a['used_share'] >= 0.95 else '**not met**'})"],
    ]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"`flagship bench lm --governor`, {when} (2 shared cores): two LM workers, a fake LM server "
            f"answering in 50 ms, {c['calls']} calls per case ({c['hits_in_history']} of the last ones recorded "
            "as `cache_hit` in the history):\n\n" + markdown_table(["case", "measured", "vs goal"], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench lm")
    parser.add_argument("--sessions", type=int, default=64, help="sessions (producer threads; in-process threads)")
    parser.add_argument("--per-session", type=int, default=4, help="calls per session, one after another")
    parser.add_argument("--delay-s", type=float, default=0.2, help="the fake LM server's answer time")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (median reported)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, help="threads per worker (default: the LM pool kind's)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="replace the `lm` section of docs/benchmarks.md")
    parser.add_argument("--program", action="store_true", help="the two-predictor program case (lm_program)")
    parser.add_argument("--governor", action="store_true", help="the fleet cache and limiter cases")
    parser.add_argument("--stream", action="store_true", help="time to first chunk vs dspy.streamify (lm_stream)")
    parser.add_argument("--tracing", action="store_true", help="tracing's CPU per call, off and on (bench tracing)")
    args = parser.parse_args(argv)
    if args.tracing:
        from tasks.bench import tracing

        return tracing.main([*(["--json"] if args.json else []), *(["--write-docs"] if args.write_docs else [])])
    if args.stream:
        from tasks.bench import lm_stream

        found = lm_stream.run()
        if args.write_docs:
            update_section("lm_stream", lm_stream.markdown(found))
        print(json.dumps(found, indent=2) if args.json else lm_stream.markdown(found))
        return 0
    if args.governor:
        found = governor_run()
        if args.write_docs:
            update_section("lm_governor", governor_markdown(found))
        print(json.dumps(found, indent=2) if args.json else governor_markdown(found))
        return 0
    if args.program:
        from tasks.bench import lm_program

        found = lm_program.run(args.sessions, args.per_session, args.delay_s, args.rounds, args.workers)
        if args.write_docs:
            update_section("lm_program", lm_program.markdown(found))
        print(json.dumps(found, indent=2) if args.json else lm_program.markdown(found))
        return 0
    report = run(args.sessions, args.per_session, args.delay_s, args.rounds, args.workers, args.concurrency)
    if args.write_docs:
        update_section("lm", markdown(report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
    return 0
