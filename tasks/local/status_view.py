"""Rendering `flagship status` as tables or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from routing import names
from routing.broker.connect import server_address
from routing.broker.embedded import resolve_url
from routing.fleet.status import fleet_snapshot
from routing.pools import PoolTable
from routing.settings import Settings


def render_status(as_json: bool = False) -> None:
    settings = Settings.from_env()
    url = resolve_url(settings)
    data = fleet_snapshot(url, settings, PoolTable.load(settings.pools_config))  # every broker's
    data["primary"] = server_address(url)  # with Sentinel: the primary the sentinels name now
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = Console()
    pools = Table(title=f"pools @ {data['redis_url']} (primary {data['primary']})")
    several = len(data["brokers"]) > 1  # pools on their own brokers: say which is where
    for col in ("pool", "affinity", "requires", "live workers", "queued (shared)", *(["broker"] if several else [])):
        pools.add_column(col)
    for p in data["pools"]:
        pools.add_row(p["name"], p["affinity"], ",".join(p["requires"]) or "-", str(p["live_workers"]),
                      str(p["queued"]), *([p["broker"]] if several else []))
    workers = Table(title="workers")
    for col in ("node", "pool", "pid", "live", "capabilities", "programs", "sessions", "refs", "in flight",
                "queued (direct)", "heartbeat age s"):
        workers.add_column(col)
    for w in data["workers"]:
        workers.add_row(w["node"], w["pool"], str(w["pid"]), "yes" if w["live"] else "NO",
                        ",".join(w["capabilities"]) or "-", "\n".join(w.get("programs") or []) or "-",
                        str(w["sessions"]), str(w["refs"]),
                        f"{w['in_flight']}/{w['concurrency']}", str(w["queued"]), str(w["heartbeat_age_s"]))
    sessions = Table(title="sessions")
    for col in ("session", "pool", "affinity", "worker", "idle s"):
        sessions.add_column(col)
    for s in data["sessions"]:
        sessions.add_row(s["id"], s["pool"], s["affinity"], s["worker"] or "(unbound)", str(s["idle_s"]))
    counters = Table(title="reliability counters (fleet, ever)")
    for name in data["reliability"]:
        counters.add_column(name.replace("_", " "))
    counters.add_row(*(str(value) for value in data["reliability"].values()))
    for table in (pools, workers, sessions, deadletter_table(data["deadletter"]), counters):
        console.print(table)
    if several:
        console.print(brokers_table(data["brokers"]))


def brokers_table(brokers: list[dict[str, Any]]) -> Table:
    """Each broker: its pools, current server, workers, sessions and dead letters."""
    table = Table(title="brokers")
    for col in ("broker", "server", "pools", "workers", "sessions", "dead letters held"):
        table.add_column(col)
    for b in brokers:
        table.add_row(b["url"], b["primary"], ",".join(b["pools"]) or "-", str(b["workers"]), str(b["sessions"]),
                      str(b["deadletter"]["held"]))
    return table


def deadletter_table(summary: dict[str, Any]) -> Table:
    """The newest dead-lettered messages, under a title with the counts."""
    table = Table(title=f"dead letters: {summary['held']} held ({names.DEADLETTER_KEY}), {summary['total']} ever")
    for col in ("at (UTC)", "queue", "task id", "reason"):
        table.add_column(col)
    for entry in summary["recent"]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("at") or 0)))
        table.add_row(at, str(entry.get("queue")), str(entry.get("task_id") or "-"), str(entry.get("reason")))
    return table
