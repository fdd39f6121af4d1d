"""How much a warmed SandboxPool saves per RLM call over DSPy's default.

DSPy's default gives every RLM call a new ``PythonInterpreter`` that starts
Deno + Pyodide on its first ``execute``. The pool starts the next sandbox while
the current call runs. Both are timed from "a call wants an interpreter" to
"its first snippet ran". Calls are spaced so the pool has refilled, as it has
when each RLM call takes longer than a sandbox start (model calls do). The
first call is left out: it is the warm-up for both.

``python -m tasks.bench.sandbox [--calls N]`` prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from dspy.primitives.python_interpreter import PythonInterpreter

from tasks.sandbox.paths import sandbox_paths
from tasks.sandbox.pool import SandboxPool
from tasks.sandbox.setup import ensure_sandbox_cache

__all__ = ["bench_sandbox", "main"]

_SNIPPET = "print(1 + 1)"


def _dspy_default(deno_dir: Path) -> PythonInterpreter:
    """DSPy's stock interpreter and permissions; only the offline import map and our cache are added."""
    paths = sandbox_paths(deno_dir)
    command = [
        "env", f"DENO_DIR={paths.deno_dir}", "DENO_NO_PACKAGE_JSON=1",
        paths.deno_bin, "run", "--no-config", "--no-lock", "--node-modules-dir=false",
        f"--import-map={paths.import_map}",
        f"--allow-read={paths.runner},{paths.deno_dir}",
        str(paths.runner), "", f"--dspy-deno-dir={paths.deno_dir}",
    ]
    return PythonInterpreter(deno_command=command)


def _time_first_execute(get_interpreter: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    interpreter = get_interpreter()
    output = interpreter.execute(_SNIPPET)
    elapsed_s = time.perf_counter() - began
    if str(output).strip() != "2":
        raise RuntimeError(f"benchmark snippet printed {output!r}")
    return elapsed_s, interpreter


def bench_sandbox(calls: int = 5, *, deno_dir: Path | None = None) -> dict[str, Any]:
    """Seconds to a ready interpreter for calls 2..N: warmed pool vs a new PythonInterpreter per call."""
    if calls < 2:
        raise ValueError("calls must be >= 2 (the first call is the warm-up)")
    directory = ensure_sandbox_cache(deno_dir)
    default_s: list[float] = []
    for _ in range(calls):
        elapsed_s, interpreter = _time_first_execute(lambda: _dspy_default(directory))
        interpreter.shutdown()
        default_s.append(elapsed_s)

    pool_s: list[float] = []
    with SandboxPool(size=1, deno_dir=directory) as pool:
        for _ in range(calls):
            if not pool.wait_ready(timeout_s=120.0):
                raise RuntimeError("sandbox pool did not refill within 120 s")
            elapsed_s, interpreter = _time_first_execute(pool.acquire)
            pool.release(interpreter)
            pool_s.append(elapsed_s)

    default_median_s = statistics.median(default_s[1:])
    pool_median_s = statistics.median(pool_s[1:])
    return {
        "calls": calls,
        "dspy_default_s": [round(value, 4) for value in default_s[1:]],
        "pool_s": [round(value, 4) for value in pool_s[1:]],
        "dspy_default_median_s": round(default_median_s, 4),
        "pool_median_s": round(pool_median_s, 4),
        "speedup": round(default_median_s / pool_median_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.bench.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = bench_sandbox(args.calls)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"time to a ready interpreter, calls 2..{result['calls']} (seconds):")
    print(f"  DSPy default (new PythonInterpreter per call): {result['dspy_default_s']}")
    print(f"  warmed SandboxPool:                            {result['pool_s']}")
    print(f"  median: {result['dspy_default_median_s']} s vs {result['pool_median_s']} s "
          f"-> {result['speedup']}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
