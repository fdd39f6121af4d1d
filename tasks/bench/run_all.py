"""`flagship bench all`: every benchmark, one after another, each rewriting its section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

#: Run in this order (cheapest first); each module's ``main(argv)`` takes ``--write-docs``.
BENCHMARKS = ("routing", "tracing", "payload", "batch", "lm", "scale", "sandbox")
MODULES = {"routing": "tasks.bench.routing", "tracing": "tasks.bench.tracing", "payload": "tasks.bench.payload",
           "batch": "tasks.bench.batch",
           "lm": "tasks.bench.lm", "scale": "tasks.bench.scale", "sandbox": "tasks.bench.sandbox"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench all")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="a subset, in the usual order")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    failed = []
    for name in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        print(f"==> flagship bench {name}", flush=True)
        started = time.monotonic()
        writes_docs = name != "sandbox" and not args.no_docs  # the sandbox bench prints only
        status = importlib.import_module(MODULES[name]).main(["--write-docs"] if writes_docs else [])
        print(f"==> {name}: exit {status} in {time.monotonic() - started:.0f} s", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
