"""The tables of ``flagship bench broker``: one section of ``docs/scaling.md`` each (see ``bench_report``)."""

from __future__ import annotations

from typing import Any

from tasks.bench.helpers.report import markdown_table

SIDES = {"plain_celery_noop": "plain Celery `flagship.noop` (baseline)", "strict_ping": "strict session `ping`",
         "hint_ping": "hint session `ping`", "map_item": "one item of `session.map` (chunks of 500)"}
#: The sections of docs/scaling.md this benchmark owns (``<!-- bench:NAME -->`` markers), in page order.
SECTIONS = ("broker-calls", "broker-idle", "broker-memory", "broker-throughput", "broker-projection")
#: The fleet the projection is computed for.
WORKERS, SESSIONS, POOLS = 1000, 100_000, 10


def _n(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def calls_section(report: dict[str, Any], command: str) -> str:
    sides = report["per_call"]
    rows: list[list[object]] = [[label, _n(sides[k]["total_commands"]), _n(sides[k]["net_in_bytes"], 0),
             _n(sides[k]["net_out_bytes"], 0), _n(sides[k]["keys"]), _n(sides[k]["server_usec"], 1)]
            for k, label in SIDES.items()]
    names = sorted({c for s in sides.values() for c in s["commands"]},
                   key=lambda c: -max(s["commands"].get(c, 0) for s in sides.values()))
    by_name: list[list[object]] = [[f"`{c}`", *[_n(sides[k]["commands"].get(c, 0.0)) for k in SIDES]] for c in names
               if max(abs(sides[k]["commands"].get(c, 0.0)) for k in SIDES) >= 0.05]
    return "\n\n".join([
        f"```bash\n{command}\n```",
        f"Run {report['when']} on {report['machine']}; {report['server']}. {report['calls']} calls per side, "
        "one at a time, each side minus an idle baseline of the same length (heartbeats, watches and "
        "housekeeping go on meanwhile). Counted by the server (`INFO commandstats`, `INFO stats`): every "
        "client, the commands a Lua script runs included (under their own names, plus one `evalsha`).",
        markdown_table(["per call", "Redis commands", "bytes in", "bytes out", "keys left (1 h)",
                        "server µs (commandstats)"], rows),
        "By command (per call; a pipeline or script counts each command it holds):",
        markdown_table(["command", *SIDES.values()], by_name),
    ])


def idle_section(report: dict[str, Any]) -> str:
    idle, mem = report["idle"], report["memory"]
    rows = [
        ["one idle worker (heartbeat, pulse, housekeeping, Celery's own polling)", idle["per_worker_per_s"]],
        ["one idle producer with a strict and a hint session (watch of 2 workers)", idle["per_producer_per_s"]],
        ["one open session (with one ref), on top", mem["idle_per_session_per_s"]],
        [f"one known node, per worker of its pool ({idle['known_nodes_added']} added to `flagship:direct-queues`)",
         idle["per_known_node_per_strict_worker_per_s"]],
    ]
    table = [[label, _n(u["total_commands"], 3), _n(u["net_in_bytes"], 1), _n(u["net_out_bytes"], 1),
              _n(100 * u["server_cpu_s"], 3),
              ", ".join(f"`{c}` {v:g}" for c, v in list(u["commands"].items())[:6])] for label, u in rows]
    usec = idle["per_known_node_usec"]
    return "\n\n".join([
        f"Idle traffic, per second ({idle['seconds']:.0f} s per measurement; differences of whole-server "
        "counts, so small values are noisy):",
        markdown_table(["per second", "commands", "bytes in", "bytes out", "server CPU %", "largest"], table),
        f"Connections to the server: {idle['connections']['per_worker']:g} per worker (Celery's consumer, "
        f"publisher, result backend and pidbox; the heartbeat's client; the pulse), "
        f"{idle['connections']['per_producer']:g} per producer. "
        f"Every known node also costs each worker's `HGETALL flagship:direct-queues` "
        f"{idle['per_known_node_bytes_out_per_worker_per_s']:.1f} bytes/s of output and "
        f"{usec['hgetall']:.4f} µs/s of server time, and each worker of its pool "
        f"{usec['checks']:.4f} µs/s for its `EXISTS`/`LLEN`/`EXISTS` check (commandstats time: command "
        "execution only, without protocol parsing and I/O; see the throughput section for that factor).",
    ])


def memory_section(report: dict[str, Any]) -> str:
    mem = report["memory"]
    kinds = [[f"`{kind}`", k["type"], k["count"], _n(k["bytes_each"], 0)] for kind, k in mem["kinds"].items()]
    return "\n\n".join([
        f"{mem['sessions']} sessions opened (eager bind) on the strict pool: **{mem['per_session_bytes']:,.0f} "
        f"bytes** and {mem['per_session_keys']:.2f} keys each (`INFO memory` used_memory, `DBSIZE`); then one "
        f"`session.lm()` each (a ref: its recipe, and the call's stored result, kept 1 h): "
        f"**{mem['per_ref_call_bytes']:,.0f} bytes** and {mem['per_ref_call_keys']:.2f} keys each.",
        f"Opening one session (eager bind on a pool of 2 workers, `routing/broker/scripts/bind_session.lua`): "
        f"{mem['per_open']['total_commands']:.1f} commands, {mem['per_open']['server_usec']:.1f} µs of server "
        "time (" + ", ".join(f"`{c}` {v:g}" for c, v in list(mem["per_open"]["commands"].items())[:8]) + ").",
        "Every key at that moment, by kind (`MEMORY USAGE ... SAMPLES 0` of up to 20 of each):",
        markdown_table(["key", "type", "count", "bytes each"], kinds),
    ])


def throughput_section(report: dict[str, Any]) -> str:
    tput = report["throughput"]
    rows = [[i, _n(r["calls_s"], 0), _n(100 * r["server_cpu_util"], 0), _n(r["server_cpu_ms_per_call"], 4),
             _n(r["ceiling_calls_s"] or 0, 0), _n(r["commands_per_call"]), _n(r["server_commands_s"], 0),
             _n(100 * r["producer_cpu_util"], 0), _n(100 * r["workers_cpu_util"], 0)]
            for i, r in enumerate(tput["rounds"], 1)]
    best = tput["best"]
    ceilings = [r["ceiling_calls_s"] for r in tput["rounds"] if r["ceiling_calls_s"]]
    cpu_ms = [r["server_cpu_ms_per_call"] for r in tput["rounds"]]
    return "\n\n".join([
        f"Bursts of {tput['calls_per_round']} strict `ping`s over {tput['sessions']} sessions on 2 workers "
        "(8 threads each), all submitted at once, then awaited; the server's CPU-seconds from `/proc`:",
        markdown_table(["round", "calls/s reached", "server CPU %", "server CPU ms/call",
                        "ceiling: 1 / CPU per call (calls/s)", "commands/call", "server commands/s",
                        "producer CPU %", "workers CPU %"], rows),
        f"**Reached: {best['calls_s']:,.0f} calls/s with the server at {100 * best['server_cpu_util']:.0f} % of "
        f"one core; server-bound ceiling: ~{best['ceiling_calls_s'] or 0:,.0f} calls/s** (one core, this "
        "command mix). On 2 cores the producer and the workers (Python) saturate long before the server: the "
        "reached figure is theirs, the ceiling is the server's. CPU numbers move with the other work on the "
        "machine; command and byte counts do not.",
        f"Across the rounds: server CPU {min(cpu_ms):.2f}–{max(cpu_ms):.2f} ms per call, a ceiling of "
        f"{min(ceilings or [0]):,.0f}–{max(ceilings or [0]):,.0f} calls/s per server core (the figures the limits "
        "below and the operations page quote).",
    ])


def projection_section(report: dict[str, Any]) -> str:
    """The measured per-unit costs, multiplied out to 1,000 workers and 100,000 sessions."""
    idle, mem, best = report["idle"], report["memory"], report["throughput"]["best"]
    worker, node, session = idle["per_worker_per_s"], idle["per_known_node_usec"], mem["idle_per_session_per_s"]
    producer = idle["per_producer_per_s"]
    factor = idle["cpu_over_usec"]  # server CPU (/proc) per second of commandstats time, small commands

    def cores(usec_per_s: float) -> str:
        return _n(usec_per_s * factor / 1e6, 2)

    per_pool = WORKERS // POOLS
    check = idle["per_known_node_per_strict_worker_per_s"]["total_commands"]
    rows: list[list[object]] = [
        ["heartbeats, pulses, Celery polling (`routing/fleet/heartbeat.py`, `routing/fleet/pulse.py`)",
         f"{WORKERS:,} × {worker['total_commands']:.1f}", _n(WORKERS * worker["total_commands"], 0),
         cores(WORKERS * worker["server_usec"])],
        [f"known-node checks, {POOLS} pools of {per_pool} (`routing/fleet/reaper.py`)",
         f"{WORKERS:,} × {per_pool} × {check:.2f}", _n(WORKERS * per_pool * check, 0),
         cores(WORKERS * per_pool * node["checks"])],
        [f"known-node checks, one pool of {WORKERS:,}", f"{WORKERS:,} × {WORKERS:,} × {check:.2f}",
         _n(WORKERS * WORKERS * check, 0), cores(WORKERS * WORKERS * node["checks"])],
        [f"`HGETALL` of the {WORKERS:,}-entry known-node hash by every worker every 2 s", f"{WORKERS:,} × 0.5",
         _n(WORKERS * 0.5, 0), cores(WORKERS * WORKERS * node["hgetall"])],
        [f"session prune + sweep, {SESSIONS:,} sessions (`routing/fleet/sessions.py`, `tasks/worker/state.py`)",
         f"{SESSIONS:,} × {session['total_commands']:.2f}", _n(SESSIONS * session["total_commands"], 0),
         cores(SESSIONS * session["server_usec"])],
        [f"one producer watching {WORKERS:,} bound workers (`routing/producer/watch.py`)",
         f"{WORKERS:,} × {producer['total_commands'] / 2:.1f}", _n(WORKERS * producer["total_commands"] / 2, 0),
         cores(WORKERS * producer["server_usec"] / 2)],
        ["1,000 calls/s (strict `ping`)", f"1,000 × {report['per_call']['strict_ping']['total_commands']:.1f}",
         _n(1000 * report["per_call"]["strict_ping"]["total_commands"], 0),
         _n(1000 * best["server_cpu_ms_per_call"] / 1000, 2)],
    ]
    hgetall_mb = WORKERS * WORKERS * idle["per_known_node_bytes_out_per_worker_per_s"] / 1e6
    result_bytes = mem["kinds"].get("celery-task-meta-<id>", {}).get("bytes_each", 0.0)
    return "\n\n".join([
        f"The measured unit costs above, multiplied out to {WORKERS:,} workers and {SESSIONS:,} sessions. "
        f"Server cores: commandstats time × {factor:.1f} (the server's `/proc` CPU over its commandstats time "
        "for these small commands, measured in the known-node run: parsing and I/O on top of execution); "
        "the call row uses the throughput run's CPU per call:",
        markdown_table(["work", "how (per second)", "commands/s", "server cores"], rows),
        f"Bytes: the known-node `HGETALL`s alone send {hgetall_mb:,.0f} MB/s at {WORKERS:,} workers. Memory: "
        f"{SESSIONS:,} bound sessions with one ref each hold "
        f"{SESSIONS * (mem['per_session_bytes'] + mem['per_ref_call_bytes'] - result_bytes) / 1e6:,.0f} MB; "
        f"every call's stored result (~{result_bytes:,.0f} bytes for a `ping`) stays an hour "
        f"(`result_expires`), so 1,000 calls/s keep {1000 * 3600 * result_bytes / 1e9:,.1f} GB of results.",
    ])


def markdown(report: dict[str, Any], command: str) -> dict[str, str]:
    """Section name -> markdown, for ``update_section(name, text, doc=docs/scaling.md)``."""
    texts = (calls_section(report, command), idle_section(report), memory_section(report),
             throughput_section(report), projection_section(report))
    return dict(zip(SECTIONS, texts, strict=True))
