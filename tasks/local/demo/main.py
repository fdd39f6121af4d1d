"""`flagship demo`: run the flagship job, starting (and afterwards stopping) a stack when none runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console as RichConsole
from rich.progress import Progress

from routing import Client, Settings
from routing.broker.connect import redis_client
from routing.broker.embedded import read_record, resolve_url, stop_server
from routing.errors import ServerUnavailable
from routing.fleet.registry import Registry
from routing.pools import PoolTable
from routing.settings import redact_url
from tasks.local.demo.run import Console, FlagshipRun, Hooks, Options
from tasks.local.stack import Stack, example_programs_env


def _live_workers(settings: Settings, pool: str) -> int:
    try:
        redis = redis_client(resolve_url(settings), decode_responses=True, socket_connect_timeout=2)
        return sum(w.live for w in Registry(redis, settings).workers([pool]))
    except (ServerUnavailable, RedisError):
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flagship demo", description="The flagship multi-pool RLM run.")
    p.add_argument("--json", action="store_true", help="print one JSON report instead of progress")
    p.add_argument("--lm", help="DSPy model string (default: FLAGSHIP_LM, GEMINI_API_KEY, else offline)")
    p.add_argument("--stack", choices=["auto", "own", "external"], default="auto",
                   help="auto: use running workers, else start server + workers and stop them afterwards")
    p.add_argument("--per-pool", type=int, default=2, help="workers per pool when the demo starts its own")
    p.add_argument("--triage-pool", default="triage_pool")
    p.add_argument("--rlm-pool", default="rlm_pool")
    p.add_argument("--analytics-pool", default="analytics_pool")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one call may take")
    return p


def summary(report: dict[str, Any], say: Any) -> None:
    rlm = report["rlm"]
    answer = (rlm.get("answer") or "")[:80] if rlm["status"] == "ok" else f"({rlm['status']})"
    a = report["analytics"]
    say("")
    say("summary")
    say(f"  tickets triaged : {len(report['triage'])}")
    say(f"  RLM answer      : {answer}")
    say(f"  score mean/std  : {a['mean']:.3f} / {a['std']:.3f}")
    say(f"  wall time       : {report['elapsed_s']:.2f} s")
    for r in report["rehydrations"]:
        say(f"  rehydrated      : {r['session']} {r['from']} -> {r['to']}")


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings.from_env()
    err = RichConsole(stderr=True)
    out = RichConsole()
    say = (lambda text: err.print(text, markup=False, highlight=False, soft_wrap=True)) if args.json else \
        (lambda text: out.print(text, markup=False, highlight=False, soft_wrap=True))
    server_was_running = bool(settings.redis_url) or read_record(settings.home) is not None
    own = args.stack == "own" or (args.stack == "auto" and not _live_workers(settings, args.triage_pool))
    stack = None
    if own:
        env = {**example_programs_env(), **({"FLAGSHIP_LM": args.lm} if args.lm else {})}
        stack = Stack(settings, env=env, loglevel="warning")
        say(f"starting {args.per_pool} worker(s) per pool against {redact_url(stack.redis_url)} "
            f"(logs in {stack.log_dir}) ...")
        pools = [args.triage_pool, args.rlm_pool, args.analytics_pool]
        serving = stack.start_pools(per_pool=args.per_pool, pools=pools)
        say(f"{len(serving)} worker(s) serving: " + ", ".join(w.node for w in serving))
    PoolTable.load(settings.pools_config)  # fail on a bad pool config before opening sessions
    client = Client(stack.redis_url if stack else resolve_url(settings), settings)
    options = Options(args.lm, args.triage_pool, args.rlm_pool, args.analytics_pool, args.timeout)
    try:
        if args.json:
            report = FlagshipRun(client, options, Console(say=say), hooks or Hooks()).run()
        else:
            with Progress(console=out, transient=True) as progress:
                task = progress.add_task("triage", total=5)
                console = Console(say=say, progress=lambda done, total: progress.update(task, completed=done))
                report = FlagshipRun(client, options, console, hooks or Hooks()).run()
    finally:
        client.close()
        if stack is not None:
            stack.stop()
            if not server_was_running:
                stop_server(settings.home)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        summary(report, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
