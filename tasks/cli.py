"""The ``flagship`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import time

from routing.broker.brokers import broker_url
from routing.broker.embedded import ensure_server, read_record, resolve_url, stop_server
from routing.broker.failures import check_broker, translated
from routing.errors import ServerUnavailable
from routing.pools import PoolTable
from routing.settings import Settings
from tasks.worker.refusal import EXIT_UNAVAILABLE


def _worker(args: argparse.Namespace) -> int:
    """Become ``celery worker`` for one pool (exec: same pid, so signals and Flower see it as usual)."""
    settings = Settings.from_env()
    pool = PoolTable.load(settings.pools_config).get(args.pool)
    from routing.names import pool_queue, qualify_node, worker_queue

    node = qualify_node(args.name or f"{pool.name.removesuffix('_pool')}-{os.getpid()}")
    # Everything of the worker (broker, results, registry, heartbeat) on its pool's broker; the embedded
    # server is started only for a pool on the default broker.
    url = broker_url(pool, "") or ensure_server(settings)
    try:  # before exec'ing Celery, which would log a traceback and retry the broker 100 times
        check_broker(url)
    except ServerUnavailable as exc:
        print(f"worker {node} cannot start: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE
    os.environ["REDIS_URL"] = url
    os.environ["FLAGSHIP_POOL"] = pool.name
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "threads",
            "-c", str(args.concurrency or pool.concurrency), "-n", node,
            "-Q", f"{pool_queue(pool.name)},{worker_queue(node)}",
            "--without-mingle", "--without-gossip", "-l", args.loglevel, *_passed_on(args.celery_args)]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def _passed_on(celery_args: list[str]) -> list[str]:
    """``flagship worker ... -- --include mod``: options after ``--`` go to Celery as they are."""
    return celery_args[1:] if celery_args[:1] == ["--"] else celery_args


def _server(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.action == "start":
        print(ensure_server(settings))
    elif args.action == "stop":
        print("stopped" if stop_server(settings.home) else "no embedded server running")
    else:
        record = read_record(settings.home)
        print(json.dumps(record.__dict__ if record else None))
    return 0


def _status(args: argparse.Namespace) -> int:
    from tasks.local.status_view import render_status

    url = resolve_url(Settings.from_env())
    check_broker(url)
    while True:
        with translated(url):
            render_status(as_json=args.json)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _up(args: argparse.Namespace) -> int:
    """Server plus every pool's workers in the foreground until Ctrl-C (or SIGTERM), which stops them."""
    from tasks.local.up import run_up

    return run_up(per_pool=args.per_pool, keep_server=args.keep_server)


def _metrics(args: argparse.Namespace) -> int:
    from tasks.local.metrics import serve

    return serve(args.port, args.address, wait_s=args.wait_s, sessions_every_s=args.sessions_every)


#: ``flagship bench NAME``: the module whose ``main(argv)`` runs that benchmark.
BENCHES = {
    "routing": "tasks.bench.routing",
    "sandbox": "tasks.bench.sandbox",
    "lm": "tasks.bench.lm",
    "batch": "tasks.bench.batch",
    "payload": "tasks.bench.payload",
    "scale": "tasks.bench.scale",
    "broker": "tasks.bench.broker",
    "chaos": "tasks.bench.chaos",
    "tracing": "tasks.bench.tracing",
    "all": "tasks.bench.run_all",
}


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.what])
    return int(module.main(args.bench_args) or 0)


def _demo(args: argparse.Namespace) -> int:
    from tasks.local.demo.main import main as demo_main

    return int(demo_main(args.demo_args) or 0)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="flagship", description="DSPy pools on Celery + Redis")
    sub = root.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run one worker node of a pool (a celery worker)")
    worker.add_argument("--pool", required=True)
    worker.add_argument("--name", help=f"node name (default <pool>-<pid>@{socket.gethostname()})")
    worker.add_argument("--concurrency", type=int, help="threads (default: the pool's concurrency)")
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed on to celery worker")
    worker.set_defaults(fn=_worker)

    server = sub.add_parser("server", help="the embedded Valkey server (ignored with REDIS_URL)")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.set_defaults(fn=_server)

    status = sub.add_parser("status", help="pools, workers, sessions, queue depths")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    status.set_defaults(fn=_status)

    metrics = sub.add_parser("metrics", help="serve Prometheus metrics on /metrics: pools, workers, queues, "
                                              "sessions, call latency")
    metrics.add_argument("--port", type=int, default=int(os.environ.get("FLAGSHIP_METRICS_PORT") or 9808),
                         help="default 9808 (FLAGSHIP_METRICS_PORT)")
    metrics.add_argument("--address", default=os.environ.get("FLAGSHIP_METRICS_ADDRESS") or "127.0.0.1",
                         help="listen address (default 127.0.0.1, FLAGSHIP_METRICS_ADDRESS; 0.0.0.0 in containers)")
    metrics.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the embedded server")
    metrics.add_argument("--sessions-every", type=float, default=30.0, metavar="SECONDS",
                         help="re-read session records (count, rehydrations) at most this often")
    metrics.set_defaults(fn=_metrics)

    up = sub.add_parser("up", help="start the server and every pool's workers in the foreground")
    up.add_argument("--per-pool", type=int, help="workers per pool (default: each pool's size)")
    up.add_argument("--keep-server", action="store_true",
                    help="leave the embedded server running on exit (one running before `up` is always left)")
    up.add_argument("--stop-server", action="store_true", help=argparse.SUPPRESS)  # the default now
    up.set_defaults(fn=_up)

    bench = sub.add_parser("bench", help="benchmarks against same-run baselines (see docs/benchmarks.md)")
    bench.add_argument("what", choices=sorted(BENCHES))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)

    demo = sub.add_parser("demo", help="the flagship multi-pool RLM run")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(fn=_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ServerUnavailable as exc:  # one line naming the cause (URL masked), not a traceback
        print(f"{' '.join(['flagship', *argv[:1]])}: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE


def _main(argv: list[str]) -> int:
    # `demo` and `bench <what>` parse their own options: hand them everything after the subcommand.
    if argv[:1] == ["demo"]:
        return _demo(argparse.Namespace(demo_args=argv[1:]))
    if argv[:1] == ["bench"] and len(argv) >= 2 and argv[1] in BENCHES:
        return _bench(argparse.Namespace(what=argv[1], bench_args=argv[2:]))
    args = parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
