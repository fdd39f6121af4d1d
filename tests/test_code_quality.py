"""The project's own rules, checked by real tools: layering, lint, types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_routing_imports_neither_dspy_nor_tasks() -> None:
    probe = ("import sys, routing, routing.producer.client, routing.fleet.recipes, routing.fleet.status, "
             "routing.broker.embedded; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dspy', 'tasks')); "
             "print(bad); sys.exit(1 if bad else 0)")
    done = run(sys.executable, "-c", probe)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_finds_nothing() -> None:
    done = run(sys.executable, "-m", "ruff", "check", "routing", "tasks", "tests", "examples", "bootstrap.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_passes_on_routing() -> None:
    done = run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_contracts_hold() -> None:
    """The house plan (.importlinter): routing alone, tasks in layered rooms, the producer chain, no loops."""
    done = run(sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()")
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout + done.stderr


def test_no_module_over_300_lines() -> None:
    long = {str(path.relative_to(ROOT)): n for path in [*ROOT.glob("routing/**/*.py"), *ROOT.glob("tasks/**/*.py")]
            if (n := len(path.read_text().splitlines())) > 300}
    assert not long, long
