"""Rendering `flagship status` as tables or JSON.

Names (nodes, pools, sessions, brokers) are never cut. Piped (not a terminal), tables take their natural
width, so ``flagship status | cat`` or ``| grep triage-1`` sees each row whole on one line. A table wider
than the terminal is listed instead, one record each: its name on a line, then its fields, wrapped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

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
    render_tables(data, status_console())


def status_console() -> Console:
    """A terminal's width; piped, wide enough for any table (a pipe has no width to fit)."""
    console = Console()
    return console if console.is_terminal else Console(width=piped_width_chars, soft_wrap=False)


#: Piped output's width limit: tables take their natural width below it.
piped_width_chars = 1000


def fitted(console: Console, title: str, columns: tuple[str, ...], rows: list[list[str]]) -> RenderableType:
    """A table of ``rows`` if it fits the console, else the same as records (the first column names each)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    if console.measure(table, options=console.options.update_width(piped_width_chars)).maximum <= console.width:
        return table
    lines: list[RenderableType] = [Text(title, style="bold italic", justify="center")]
    room = console.width - 2
    for row in rows:
        fields = [f"{col}: {value.replace(chr(10), ', ')}" for col, value in zip(columns[1:], row[1:])]
        short, long = [f for f in fields if len(f) <= room], [f for f in fields if len(f) > room]
        lines += [Text(row[0], style="bold"), Padding(Columns(short, padding=(0, 2)), (0, 0, 0, 2)),
                  *(Padding(Text(field, overflow="fold"), (0, 0, 0, 2)) for field in long)]  # wrapped, never cut
    return Group(*lines, Text(""))


def render_tables(data: dict[str, Any], console: Console) -> None:
    """Every table of ``flagship status`` from a fleet snapshot."""
    several = len(data["brokers"]) > 1  # pools on their own brokers: say which is where
    pools = fitted(console, f"pools @ {data['redis_url']} (primary {data['primary']})",
                   ("pool", "affinity", "requires", "live workers", "queued (shared)", "waiting",
                    *(["broker"] if several else [])),
                   [[p["name"], p["affinity"], ",".join(p["requires"]) or "-", str(p["live_workers"]),
                     str(p["queued"]), str(p["waiting"]), *([p["broker"]] if several else [])]
                    for p in data["pools"]])
    workers = fitted(console, "workers", ("node", "pool", "pid", "live", "capabilities", "programs", "sessions",
                                          "refs", "in flight", "queued (direct)", "held", "heartbeat age s"),
                     [[w["node"], w["pool"], str(w["pid"]), "yes" if w["live"] else "NO",
                       ",".join(w["capabilities"]) or "-", "\n".join(w.get("programs") or []) or "-",
                       str(w["sessions"]), str(w["refs"]), f"{w['in_flight']}/{w['concurrency']}", str(w["queued"]),
                       str(w["held"]), str(w["heartbeat_age_s"])] for w in data["workers"]])
    sessions = fitted(console, "sessions", ("session", "pool", "affinity", "worker", "idle s"),
                      [[s["id"], s["pool"], s["affinity"], s["worker"] or "(unbound)", str(s["idle_s"])]
                       for s in data["sessions"]])
    counters = fitted(console, "reliability counters (fleet, ever)",
                      tuple(name.replace("_", " ") for name in data["reliability"]),
                      [[str(value) for value in data["reliability"].values()]])
    lm_usage = fitted(console, "LM usage (fleet, ever)", ("pool", "model", "calls", "prompt tokens",
                      "completion tokens", "cost USD", "cache hits"),
                      [[r["pool"], r["model"], str(r["calls"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
                        f"{r['cost_usd']:.4f}", str(r["cache_hits"])] for r in data.get("lm_usage", [])])
    for table in (pools, workers, sessions, deadletter_table(data["deadletter"], console), counters, lm_usage):
        console.print(table)
    if several:
        console.print(brokers_table(data["brokers"], console))


def brokers_table(brokers: list[dict[str, Any]], console: Console) -> RenderableType:
    """Each broker: its pools, current server, workers, sessions and dead letters."""
    return fitted(console, "brokers", ("broker", "server", "pools", "workers", "sessions", "dead letters held"),
                  [[b["url"], b["primary"], ",".join(b["pools"]) or "-", str(b["workers"]), str(b["sessions"]),
                    str(b["deadletter"]["held"])] for b in brokers])


def deadletter_table(summary: dict[str, Any], console: Console) -> RenderableType:
    """The newest dead-lettered messages, under a title with the counts."""
    title = f"dead letters: {summary['held']} held ({names.DEADLETTER_KEY}), {summary['total']} ever"
    rows = [[str(entry.get("task_id") or "-"),
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("at") or 0))),
             str(entry.get("queue")), str(entry.get("reason"))] for entry in summary["recent"]]
    return fitted(console, title, ("task id", "at (UTC)", "queue", "reason"), rows)
