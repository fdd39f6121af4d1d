"""`flagship bench payload`: big arguments by reference vs plain Celery, and a held context's re-query bytes.

Same server, same workers, same run. Part 1 times round trips of a call with a
1 MB argument: plain Celery (``flagship.noop`` with the argument, on a plain
Celery app), a session call with the argument inline (claim-check off) and the
same call by reference (claim-check on), interleaved in blocks. Part 2 keeps a
10 MB log on an RLM worker (``session.context``) and counts the bytes the
producer writes to Redis for each query over it (claim keys plus the task
message: every ``send_packed_command`` of the calling thread), against the
same query carrying the text and a plain Celery no-op without arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from redis.connection import AbstractConnection

from routing import Client, Pool, PoolTable, Settings, names
from routing.broker import claims
from routing.broker.celery_config import celery_config
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.local.stack import Stack

BENCH_POOL = Pool("bench_pool", size=2, concurrency=2)
RLM_POOL = "rlm_pool"
QUERY = "What are the top two recurring issues, and what should we do next?"
SIDES = ("plain_celery", "plain_celery_direct_queue", "session_inline", "session_claim_check")


def log_text(chars: int) -> str:
    """A synthetic incident log of ``chars`` characters (recurring themes the RLM can find)."""
    lines = ["2026-01-01T00:{m:02d}:{s:02d}Z api-{n} ERROR database connection pool exhausted (postgres)",
             "2026-01-01T00:{m:02d}:{s:02d}Z gw-{n} WARN upstream timed out after 30 s (504)",
             "2026-01-01T00:{m:02d}:{s:02d}Z api-{n} INFO request served in 12 ms",
             "2026-01-01T00:{m:02d}:{s:02d}Z disk-{n} WARN no space left on volume /var/log"]
    out, size, i = [], 0, 0
    while size < chars:
        line = lines[(0, 2, 1, 0, 2, 1, 0, 3)[i % 8]].format(m=i // 60 % 60, s=i % 60, n=i % 9) + "\n"
        out.append(line)
        size, i = size + len(line), i + 1
    return "".join(out)[:chars]


@dataclass
class Written:
    """What the calling thread wrote to Redis: every byte, and the bodies of the task messages among them."""

    total: int = 0
    bodies: int = 0

    def add(self, command: Any) -> None:
        parts = [command] if isinstance(command, (str, bytes)) else list(command)
        self.total += sum(len(p) for p in parts)
        packed = b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
        if packed.startswith(b"*3\r\n$5\r\nLPUSH"):  # kombu's Redis transport: one JSON envelope per message
            envelope = json.loads(packed[packed.index(b"{"):packed.rindex(b"}") + 1])
            self.bodies += len(base64.b64decode(envelope["body"]))

    def since(self, before: Written) -> Written:
        return Written(self.total - before.total, self.bodies - before.bodies)


@contextmanager
def written() -> Iterator[Written]:
    """Count what this thread writes to Redis inside the block (claim keys, task messages, result reads)."""
    original = AbstractConnection.send_packed_command
    me, seen = threading.get_ident(), Written()

    def counting(self: Any, command: Any, check_health: bool = True) -> Any:
        if threading.get_ident() == me:
            seen.add(command)
        return original(self, command, check_health)

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[round(0.99 * (len(ordered) - 1))],
            "n": len(ordered)}


def round_trips(sides: dict[str, Callable[[], Any]], calls: int, block: int) -> dict[str, dict[str, float]]:
    """Per side p50/p99 (ms), interleaved in blocks so drift hits every side alike."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(max(1, calls // block)):
        for name, fn in sides.items():
            for _ in range(block):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1000)
    return {name: _stats(s) for name, s in samples.items()}


def held_context(client: Client, plain: Celery, pool: str, chars: int, queries: int) -> dict[str, Any]:
    """Bytes the producer sends per query over a held context, over the same text inline, and for a no-op."""
    session = client.session(pool)
    text = log_text(chars)
    started = time.perf_counter()
    ctx = session.context(text)
    create_s = time.perf_counter() - started
    rlm = pool == RLM_POOL
    module = session.rlm() if rlm else session.predict("context, query -> answer")
    held: list[Written] = []
    held_s: list[float] = []
    with written() as seen:
        for _ in range(queries):
            before, t = replace(seen), time.perf_counter()
            module(context=ctx, query=QUERY, timeout_s=300)
            held.append(seen.since(before))
            held_s.append(time.perf_counter() - t)
        before, t = replace(seen), time.perf_counter()
        module(context=text, query=QUERY, timeout_s=300)
        inline, inline_s = seen.since(before), time.perf_counter() - t
        before = replace(seen)
        plain.send_task(names.NOOP_TASK, queue=names.pool_queue(BENCH_POOL.name)).get(timeout=30)
        noop = seen.since(before)
    session.close()
    return {"module": "rlm" if rlm else "predict", "context_chars": len(text), "create_s": create_s,
            "held_query_bytes": [w.total for w in held], "held_query_body_bytes": [w.bodies for w in held],
            "held_query_s": held_s, "inline_query_bytes": inline.total, "inline_query_body_bytes": inline.bodies,
            "inline_query_s": inline_s, "plain_noop_bytes": noop.total, "plain_noop_body_bytes": noop.bodies}


def run(calls: int, block: int, mb: float, context_mb: float, queries: int) -> dict[str, Any]:
    base = Settings.from_env()
    table = PoolTable.load(base.pools_config).with_pool(BENCH_POOL)
    # The inline comparison sends the whole context as one module input: allow it (1 MiB per input by default).
    max_input = int((max(mb, context_mb) + 1) * 1024 * 1024)
    settings = replace(base, pools_config=table.to_json(), max_input_bytes=max_input)
    payload = log_text(int(mb * 1024 * 1024))
    env = {"FLAGSHIP_POOLS": table.to_json(), "FLAGSHIP_MAX_INPUT_BYTES": str(max_input)}
    with Stack(settings, env=env, loglevel="warning") as stack:
        stack.start_pools(pools=[BENCH_POOL.name])
        rlm_worker = stack.start_worker(RLM_POOL, wait=False)
        rlm_ok = not stack.wait_ready([rlm_worker], allow_refused=True)
        client, inline_client = Client(stack.redis_url, settings), Client(stack.redis_url, settings)
        inline_client.router.claim_threshold_bytes = 0  # the same calls with every argument in the message
        plain = Celery("plain", set_as_current=False)  # plain Celery: its own result consumer, no routing
        plain.conf.update(celery_config(settings, stack.redis_url))
        try:
            session, inline = client.session(BENCH_POOL.name), inline_client.session(BENCH_POOL.name)
            queue, direct = names.pool_queue(BENCH_POOL.name), names.worker_queue(session.worker or "")
            sides = {
                "plain_celery": lambda: plain.send_task(names.NOOP_TASK, args=[payload], queue=queue).get(60),
                "plain_celery_direct_queue":
                    lambda: plain.send_task(names.NOOP_TASK, args=[payload], queue=direct).get(60),
                "session_inline": lambda: inline.call("payload_size", data=payload, timeout_s=60),
                "session_claim_check": lambda: session.call("payload_size", data=payload, timeout_s=60),
            }
            big = round_trips(sides, calls, block)
            small_payload = "x" * 1024
            small = round_trips({
                "session_inline": lambda: inline.call("payload_size", data=small_payload, timeout_s=60),
                "session_claim_check": lambda: session.call("payload_size", data=small_payload, timeout_s=60),
            }, calls * 10, block * 10)
            context = held_context(client, plain, RLM_POOL if rlm_ok else BENCH_POOL.name,
                                   int(context_mb * 1024 * 1024), queries)
            session.close()
            inline.close()
        finally:
            client.close()
            inline_client.close()
            plain.close()
    small_call = {"ref": "predict-0123456789ab", "inputs": {"ticket": "x" * 1024, "query": QUERY}}
    threshold = settings.claim_threshold_bytes  # nothing is big here, so offload never touches Redis
    size_check_us = timeit.timeit(lambda: claims.offload(None, "s", "call", small_call, threshold, 60),
                                  number=20_000) / 20_000 * 1e6
    return {"payload_bytes": len(payload), "size_check_us": size_check_us, "threshold_bytes": threshold,
            "latency": big, "ratio": big["session_claim_check"]["p50_ms"] / big["plain_celery"]["p50_ms"],
            "ratio_same_queue": big["session_claim_check"]["p50_ms"] / big["plain_celery_direct_queue"]["p50_ms"],
            "small_1kb": small, "context": context}


def markdown(report: dict[str, Any], argv: list[str]) -> str:
    lat, small, ctx = report["latency"], report["small_1kb"], report["context"]
    labels = {"plain_celery": "plain Celery no-op, shared queue",
              "plain_celery_direct_queue": "plain Celery no-op, same direct queue",
              "session_inline": "session call, argument inline (claim-check off)",
              "session_claim_check": "session call, argument by reference (claim-check)"}
    rows: list[list[object]] = [[labels[k], f"{lat[k]['p50_ms']:.2f}", f"{lat[k]['p99_ms']:.2f}"] for k in SIDES]
    rows.append(["**p50 ratio, claim-check / plain Celery**", f"**{report['ratio']:.3f}**", ""])
    rows.append(["p50 ratio, claim-check / plain Celery on the same queue", f"{report['ratio_same_queue']:.3f}", ""])
    small_labels = {"session_inline": "session call, claim-check off",
                    "session_claim_check": "session call, claim-check on (the argument stays in the message)"}
    small_rows: list[list[object]] = [[label, f"{small[k]['p50_ms']:.3f}", f"{small[k]['p99_ms']:.3f}"]
                                      for k, label in small_labels.items()]
    mb = ctx["context_chars"] / 1024 / 1024
    ctx_rows: list[list[object]] = [
        [f"`{ctx['module']}` query over the held context (`session.context`)",
         ", ".join(f"{b:,}" for b in ctx["held_query_bytes"]),
         ", ".join(f"{b:,}" for b in ctx["held_query_body_bytes"]), ", ".join(f"{s:.2f}" for s in ctx["held_query_s"])],
        [f"the same query with the {mb:.0f} MB text as the argument", f"{ctx['inline_query_bytes']:,}",
         f"{ctx['inline_query_body_bytes']:,}", f"{ctx['inline_query_s']:.2f}"],
        ["plain Celery no-op without arguments", f"{ctx['plain_noop_bytes']:,}", f"{ctx['plain_noop_body_bytes']:,}",
         ""],
    ]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["flagship bench payload", *[a for a in argv if a not in ("--write-docs", "--json")]])
    return "\n\n".join([
        "## Large arguments by reference (claim-check) and held contexts",
        f"```bash\n{command}\n```",
        f"Run {when}: {report['payload_bytes']:,}-byte argument (a log text), claim-check threshold "
        f"{report['threshold_bytes']:,} bytes, `bench_pool` with two workers; {lat['plain_celery']['n']} round "
        "trips per side, interleaved in blocks. Plain Celery is a plain Celery app sending `flagship.noop` "
        "with the argument; the sessions call `payload_size` (returns the argument's length).",
        markdown_table(["1 MB argument round trip", "p50 (ms)", "p99 (ms)"], rows),
        f"Target: p50 ratio ≤ 0.25. A 1 KB argument stays in the message; deciding that (the size check) "
        f"costs {report['size_check_us']:.1f} µs per call, measured in-process:",
        markdown_table(["1 KB argument round trip", "p50 (ms)", "p99 (ms)"], small_rows),
        f"Held context, same run: a {mb:.0f} MB log kept on the worker by `session.context(text)` "
        f"({ctx['create_s']:.2f} s to create, sent once by reference). Bytes the producer wrote to Redis for "
        "each call (claim keys plus the task message, counted on the calling thread's Redis connections), and "
        "the task body among them (session, operation, arguments, route; before kombu's base64 and envelope):",
        markdown_table(["call", "bytes written", "task body bytes", "seconds"], ctx_rows),
        "Target: a repeated query over a held context sends under 1 KB: its task body is well under; the "
        "whole message is Celery's fixed envelope (headers, properties, the body in base64 and an `argsrepr` "
        "copy of the arguments) around it, the same envelope a no-op without arguments pays.",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="flagship bench payload")
    parser.add_argument("--calls", type=int, default=60, help="1 MB round trips per side")
    parser.add_argument("--block", type=int, default=10, help="interleave the sides in blocks of this many")
    parser.add_argument("--mb", type=float, default=1.0, help="argument size (MiB)")
    parser.add_argument("--context-mb", type=float, default=10.0, help="held context size (MiB)")
    parser.add_argument("--queries", type=int, default=3, help="queries over the held context")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args.calls, args.block, args.mb, args.context_mb, args.queries)
    text = markdown(report, argv)
    if args.write_docs:
        update_section("payload", text)
    print(json.dumps(report, indent=2) if args.json else text)
    return 0
