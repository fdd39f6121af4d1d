"""Flower for the flagship workers, with basic auth unless explicitly told otherwise.

Reads the broker from ``REDIS_URL`` or, without it, from the embedded server
recorded in ``$FLAGSHIP_HOME/server.json`` (waiting up to ``--wait-s`` for it,
since under a Procfile the server starts alongside this process), then becomes
``celery -A tasks.app flower`` (exec: same pid), with its Broker page showing every
pool's queues on the project's transports (``tasks.local.flower_broker``).

Authentication:

* ``FLOWER_BASIC_AUTH=user:pass`` (comma-separate several) turns on basic auth for
  the dashboard and the API. Flower reads that variable itself (it takes any
  ``FLOWER_<option>``), so the password never appears on a command line or in ``ps``;
* ``FLAGSHIP_FLOWER_UNAUTHENTICATED=1`` runs it open, UI and API
  (``FLOWER_UNAUTHENTICATED_API=true``): for a loopback-only dev box;
* neither, or a credential with an empty user or password (``ops:``, ``ops``,
  ``:pw``): refuse to start with one line (exit 2).

A broker that cannot be used (wrong password, unreachable, TLS mismatch) is one
line too (exit 69), before Flower starts.

Usage: ``python deploy/run_flower.py [--port 5555] [--address 127.0.0.1] [extra flower args]``
(``FLOWER_PORT`` / ``FLOWER_ADDRESS`` work too.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from routing.broker.failures import check_broker
from routing.broker.embedded import resolve_url
from routing.errors import ServerUnavailable
from routing.settings import Settings

#: Exit status when no authentication was configured (EX_USAGE-like).
EXIT_NO_AUTH = 2
#: Exit status when no broker could be found in time.
EXIT_NO_SERVER = 69


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _broker_url(wait_s: float) -> str:
    """``REDIS_URL`` or the recorded embedded server, waiting for it to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return resolve_url(Settings.from_env())
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _weak_credentials(auth: str) -> list[str]:
    """The comma-separated credentials of ``auth`` that lack a user or a password (passwords not shown)."""
    weak = []
    for cred in auth.split(","):
        user, _, password = cred.strip().partition(":")
        if not user.strip() or not password.strip():
            weak.append(f"{user.strip() or '(no user)'}:{'***' if password.strip() else '(empty password)'}")
    return weak


#: Flower options that would override the checks below from the command line (auth belongs in the environment).
AUTH_FLAGS = ("--basic_auth", "--basic-auth", "--auth", "--unauthenticated_api", "--unauthenticated-api")


def flower_argv(args: argparse.Namespace, extra: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment to exec, or ``SystemExit`` when auth is missing."""
    env = dict(env)
    overriding = sorted({arg.split("=", 1)[0] for arg in extra if arg.split("=", 1)[0] in AUTH_FLAGS})
    if overriding:
        print(f"refusing to start Flower: {', '.join(overriding)} on the command line would bypass the "
              "authentication checks; set FLOWER_BASIC_AUTH (or FLAGSHIP_FLOWER_UNAUTHENTICATED=1) instead",
              file=sys.stderr)
        raise SystemExit(EXIT_NO_AUTH)
    auth = env.get("FLOWER_BASIC_AUTH", "").strip()
    if auth:
        weak = _weak_credentials(auth)
        if weak:
            print(f"refusing to start Flower: FLOWER_BASIC_AUTH must be user:password with both non-empty "
                  f"(comma-separated for several); got {', '.join(weak)}", file=sys.stderr)
            raise SystemExit(EXIT_NO_AUTH)
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
    elif _truthy(env.get("FLAGSHIP_FLOWER_UNAUTHENTICATED")):
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    else:
        print("refusing to start Flower without authentication: set FLOWER_BASIC_AUTH=user:password, "
              "or FLAGSHIP_FLOWER_UNAUTHENTICATED=1 to run it open on purpose", file=sys.stderr)
        raise SystemExit(EXIT_NO_AUTH)
    # celery with the Broker page made to work on the project's transports (tasks/local/flower_broker.py).
    argv = [sys.executable, "-m", "tasks.local.flower_broker", "-A", "tasks.app", "flower",
            f"--port={args.port}", f"--address={args.address}", *extra]
    return argv, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("FLOWER_PORT") or 5555))
    parser.add_argument("--address", default=os.environ.get("FLOWER_ADDRESS") or "127.0.0.1")
    parser.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the embedded server")
    args, extra = parser.parse_known_args(argv)
    command, env = flower_argv(args, extra, dict(os.environ))  # auth is checked before anything else
    try:
        env["REDIS_URL"] = _broker_url(args.wait_s)
        check_broker(env["REDIS_URL"])
    except ServerUnavailable as exc:
        print(f"no broker: {exc}", file=sys.stderr)
        return EXIT_NO_SERVER
    # Flower reads FLOWER_PORT/FLOWER_ADDRESS too; the flags above already carry them.
    env.pop("FLOWER_PORT", None)
    env.pop("FLOWER_ADDRESS", None)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.execve(sys.executable, command, env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
