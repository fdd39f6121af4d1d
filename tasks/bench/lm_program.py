"""`flagship bench lm --program`: a two-predictor program through the fleet vs ``dspy.Parallel`` in one process.

The program is the example package's ``SupportTriage`` (two predictors, so two LM
calls per call), built by name on each session's worker (``session.program``) and,
in this process, run under ``dspy.Parallel(num_threads=sessions)``. Both sides call
the same fake LM server. A third measurement runs a ``predict`` ref with the same
sessions, so the fleet's own CPU per call (beyond what DSPy spends in one process)
can be compared between a program call and a plain module call.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
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
    worker_env,
)
from tasks.bench.helpers.report import markdown_table
from tasks.local.stack import EXAMPLES_DIR, Stack, example_programs_env

PROGRAM = "support_programs.triage:SupportTriage"


def run(sessions: int = 64, per_session: int = 4, delay_s: float = 0.2, rounds: int = 3,
        workers: int = 2) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        return _run(base, sessions, per_session, delay_s, rounds, workers)


def _in_process(base_url: str, sessions: int) -> Any:
    import dspy

    sys.path.insert(0, str(EXAMPLES_DIR))
    from support_programs.triage import SupportTriage

    lm = dspy.LM(MODEL, api_base=base_url, api_key=NO_KEY, cache=False, temperature=0.0, max_tokens=4000)
    program = SupportTriage()
    parallel = dspy.Parallel(num_threads=sessions, disable_progress_bar=True)

    def calls(count: int) -> None:
        pairs = [(program, dspy.Example(ticket=TICKETS[i % len(TICKETS)]).with_inputs("ticket"))
                 for i in range(count)]
        with dspy.context(lm=lm):
            parallel(pairs)

    calls(sessions)  # warm-up
    return calls


def _run(base: Settings, sessions: int, per_session: int, delay_s: float, rounds: int,
         workers: int) -> dict[str, Any]:
    pool = Pool(POOL_NAME, size=workers, kind=PoolKind.LM)
    table = PoolTable.load(base.pools_config).with_pool(pool)
    settings = replace(base, pools_config=table.to_json())
    calls = sessions * per_session
    with FakeServer(delay_s) as server:
        env = worker_env(table.to_json(), server.base_url, **UNCACHED, **example_programs_env())
        with Stack(settings, env=env, loglevel="warning") as stack:
            procs = stack.start_pools(pools=[POOL_NAME])
            client = Client(stack.redis_url, settings)
            threads = ThreadPoolExecutor(sessions)
            try:
                opened = [client.session(POOL_NAME) for _ in range(sessions)]
                programs = [s.program(PROGRAM) for s in opened]
                predicts = [s.predict(SIGNATURE) for s in opened]

                def fleet(refs: list[Any], per: int = per_session) -> float:
                    def one(i: int) -> None:
                        for k in range(per):
                            refs[i](ticket=TICKETS[(i + k) % len(TICKETS)], timeout_s=60)
                    return _fan_out(threads, sessions, one)

                fleet(programs, 1)
                fleet(predicts, 1)
                local = _in_process(server.base_url, sessions)
                fleet_meter = CpuMeter({"producer": [os.getpid()], "workers": [p.pid for p in procs],
                                        "redis": [server_pid(stack.settings)], "lm_server": [server.proc.pid]})
                local_meter = CpuMeter({"process": [os.getpid()], "lm_server": [server.proc.pid]})
                results: dict[str, list[dict[str, Any]]] = {"program": [], "parallel": [], "predict": []}
                for _ in range(rounds):
                    results["parallel"].append(_round(local_meter, lambda: _timed(local, calls), calls))
                    results["program"].append(_round(fleet_meter, lambda: fleet(programs), calls))
                    results["predict"].append(_round(fleet_meter, lambda: fleet(predicts), calls))
                for s in opened:
                    s.close()
            finally:
                threads.shutdown()
                client.close()
    medians = {side: _median_round(rows) for side, rows in results.items()}
    return {"calls": calls, "sessions": sessions, "delay_s": delay_s, "workers": workers, **medians,
            "wall_ratio": medians["program"]["wall_s"] / medians["parallel"]["wall_s"],
            "cpu_ratio": medians["program"]["cpu_ms_per_call_total"] / medians["parallel"]["cpu_ms_per_call_total"],
            "rounds": results}


def _timed(fn: Any, calls: int) -> float:
    t = time.perf_counter()
    fn(calls)
    return time.perf_counter() - t


def markdown(report: dict[str, Any]) -> str:
    rows = [[label, f"{report[key]['wall_s']:.2f}", f"{report[key]['cpu_ms_per_call_total']:.2f}",
             ", ".join(f"{k} {v:.2f}" for k, v in report[key]["cpu_ms_per_call"].items())]
            for key, label in (("program", f"flagship: `{PROGRAM}` refs, {report['sessions']} sessions"),
                               ("parallel", f"the same program under `dspy.Parallel({report['sessions']})`"),
                               ("predict", "flagship: a `predict` ref (one LM call) on the same sessions"))]
    rows.append(["**ratio program / dspy.Parallel**", f"**{report['wall_ratio']:.3f}**",
                 f"{report['cpu_ratio']:.3f}", ""])
    return (f"{report['calls']} calls of a two-predictor program (two LM calls each), server delay "
            f"{report['delay_s'] * 1000:.0f} ms, median of {len(report['rounds']['program'])} rounds:\n\n"
            + markdown_table(["", "wall (s)", "CPU ms / call", "CPU ms / call by process"], rows) + "\n")
