"""`flagship bench lm --stream`: time to first chunk through the fleet vs ``dspy.streamify`` in one process.

Both sides stream the same ``Predict`` field from the same fake OpenAI-protocol server
(a child process, answering as Server-Sent Events: the first piece after ``delay_s``,
the next ones ``chunk_delay_s`` apart). The fleet side is ``ModuleRef.stream`` on a
worker (``dspy.streamify`` there, each chunk through a Redis stream and the client's
one ``XREAD``); the local side is ``dspy.streamify`` with the same listener in this
process. Streams run one after another, alternating sides, so each time is one
stream's latency, not a queue's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from routing import Client, Pool, PoolTable, Settings, StreamChunk
from routing.pools import PoolKind
from tasks.bench.helpers.env import own_server
from tasks.bench.helpers.lm_side import MODEL, NO_KEY, POOL_NAME, TICKETS, UNCACHED, FakeServer, worker_env
from tasks.bench.helpers.report import markdown_table
from tasks.local.stack import Stack

SIGNATURE, FIELD = "ticket -> action", "action"


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _first_chunk_s(items: Any, is_chunk: Any) -> float:
    """Seconds until ``items`` yields its first chunk; the rest is drained."""
    started, first = time.perf_counter(), 0.0
    for item in items:
        if not first and is_chunk(item):
            first = time.perf_counter() - started
    return first


def run(streams: int = 60, delay_s: float = 0.05, chunk_delay_s: float = 0.01, workers: int = 1) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        return _run(base, streams, delay_s, chunk_delay_s, workers)


def _run(base: Settings, streams: int, delay_s: float, chunk_delay_s: float, workers: int) -> dict[str, Any]:
    import dspy

    pool = Pool(POOL_NAME, size=workers, kind=PoolKind.LM)
    table = PoolTable.load(base.pools_config).with_pool(pool)
    settings = replace(base, pools_config=table.to_json())
    with FakeServer(delay_s, chunk_delay_s) as server:
        env = worker_env(table.to_json(), server.base_url, **UNCACHED)
        with Stack(settings, env=env, loglevel="warning") as stack:
            stack.start_pools(pools=[POOL_NAME])
            client = Client(stack.redis_url, settings)
            try:
                session = client.session(POOL_NAME)
                ref = session.predict(SIGNATURE)
                lm = dspy.LM(MODEL, api_base=server.base_url, api_key=NO_KEY, cache=False, temperature=0.0,
                             max_tokens=4000)
                predict = dspy.Predict(SIGNATURE)

                def fleet_one(ticket: str) -> float:
                    with ref.stream(ticket=ticket, fields=[FIELD]) as items:
                        return _first_chunk_s(items, lambda item: isinstance(item, StreamChunk))

                def local_one(ticket: str) -> float:
                    with dspy.context(lm=lm):  # a listener serves one call: a new one each time, as the worker does
                        local = dspy.streamify(predict, async_streaming=False,
                                               stream_listeners=[dspy.streaming.StreamListener(FIELD)])
                        return _first_chunk_s(local(ticket=ticket),
                                              lambda item: isinstance(item, dspy.streaming.StreamResponse))

                for i in range(5):  # warm-up: connections, threads, imports
                    fleet_one(TICKETS[i % len(TICKETS)])
                    local_one(TICKETS[i % len(TICKETS)])
                times: dict[str, list[float]] = {"fleet": [], "local": []}
                for i in range(streams):
                    ticket = f"{TICKETS[i % len(TICKETS)]} (#{i})"
                    times["fleet"].append(fleet_one(ticket))
                    times["local"].append(local_one(ticket))
                session.close()
            finally:
                client.close()
    found = {side: {"p50_ms": _percentile(t, 0.5), "p95_ms": _percentile(t, 0.95)} for side, t in times.items()}
    return {"streams": streams, "delay_s": delay_s, "chunk_delay_s": chunk_delay_s, **found,
            "p50_difference_ms": found["fleet"]["p50_ms"] - found["local"]["p50_ms"],
            "p95_difference_ms": found["fleet"]["p95_ms"] - found["local"]["p95_ms"]}


def markdown(report: dict[str, Any]) -> str:
    rows = [["flagship: `ModuleRef.stream` on a worker", f"{report['fleet']['p50_ms']:.1f}",
             f"{report['fleet']['p95_ms']:.1f}"],
            ["`dspy.streamify` in this process", f"{report['local']['p50_ms']:.1f}",
             f"{report['local']['p95_ms']:.1f}"],
            ["**difference (fleet - local)**", f"**{report['p50_difference_ms']:+.1f}**",
             f"{report['p95_difference_ms']:+.1f}"]]
    return (f"Time to the first chunk of `{FIELD}` (`{SIGNATURE}`), {report['streams']} streams per side one after "
            f"another, the server's first piece after {report['delay_s'] * 1000:.0f} ms, then one every "
            f"{report['chunk_delay_s'] * 1000:.0f} ms:\n\n"
            + markdown_table(["", "p50 (ms)", "p95 (ms)"], rows) + "\n")
