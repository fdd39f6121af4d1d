"""Fill the sandbox's Deno cache: ``python -m tasks.sandbox.setup`` once per machine (idempotent).

Pyodide comes from the npm registry once, into the project-controlled DENO_DIR
(see :mod:`tasks.sandbox.paths`); sandboxes then run with ``--cached-only`` and
no network at all. Filling does not start a sandbox: :func:`probe_sandbox` is
the one self-check, run by this CLI after a fill and by workers at start-up.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from routing.errors import SandboxError
from tasks.sandbox.paths import PYODIDE_SHIM_JS, STD_IO_JS, SandboxPaths, sandbox_paths
from tasks.sandbox.probe import probe_sandbox

__all__ = ["ensure_sandbox_cache", "is_cache_ready", "main"]

log = logging.getLogger(__name__)

#: How long `deno cache` may take to download Pyodide from npm.
cache_timeout_s = 300.0

_MARKER_NAME = ".flagship-sandbox-ready"


def _cache_key(paths: SandboxPaths) -> str:
    digest = hashlib.sha256()
    for part in (paths.runner, STD_IO_JS, PYODIDE_SHIM_JS):
        digest.update(part.read_bytes())
    stat = os.stat(paths.deno_bin)
    return json.dumps({"sources": digest.hexdigest(), "deno": [paths.deno_bin, stat.st_size, stat.st_mtime_ns]})


def is_cache_ready(directory: Path | None = None) -> bool:
    """True when Pyodide is cached and a marker records this exact runner, shims and Deno binary."""
    paths = sandbox_paths(directory)
    marker = paths.deno_dir / _MARKER_NAME
    return paths.pyodide_dir is not None and marker.is_file() and marker.read_text() == _cache_key(paths)


def _deno_cache(paths: SandboxPaths) -> None:
    env = {**os.environ, "DENO_DIR": str(paths.deno_dir), "DENO_NO_PACKAGE_JSON": "1", "NO_COLOR": "1"}
    command = [paths.deno_bin, "cache", "--no-config", "--no-lock", "--node-modules-dir=false",
               f"--import-map={paths.import_map}", str(paths.runner)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=cache_timeout_s, check=False)
    if result.returncode != 0:
        raise SandboxError(f"`deno cache` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def ensure_sandbox_cache(directory: Path | None = None) -> Path:
    """Fill DENO_DIR with Pyodide (no self-check: that is ``probe_sandbox``); returns DENO_DIR.

    Idempotent: once a marker records this exact runner, shims and Deno binary,
    later calls only compare files (milliseconds). Workers starting together
    take a file lock, so only one of them downloads.
    """
    if is_cache_ready(directory):
        return sandbox_paths(directory).deno_dir
    paths = sandbox_paths(directory)
    paths.deno_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.deno_dir / ".fill.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_cache_ready(directory):
            return paths.deno_dir
        paths = sandbox_paths(directory)
        _fill(paths)
    return paths.deno_dir


def _fill(paths: SandboxPaths) -> None:
    started = time.monotonic()
    if paths.pyodide_dir is None:
        log.info("downloading Pyodide (%s) into %s", paths.pyodide_spec, paths.deno_dir)
        _deno_cache(paths)
        paths = sandbox_paths(paths.deno_dir)
        if paths.pyodide_dir is None:
            raise SandboxError(f"`deno cache` left no Pyodide package in {paths.deno_dir}")
    (paths.deno_dir / _MARKER_NAME).write_text(_cache_key(paths))
    log.info("sandbox cache ready in %s (%.1f s)", paths.deno_dir, time.monotonic() - started)


def _forget(directory: Path) -> None:
    """Drop the marker, so the next run fills and checks again."""
    (directory / _MARKER_NAME).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.sandbox.setup", description=__doc__.splitlines()[0])
    parser.add_argument("--deno-dir", type=Path, default=None,
                        help="DENO_DIR to fill (default: $FLAGSHIP_DENO_DIR, else $FLAGSHIP_HOME/deno)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        was_ready = is_cache_ready(args.deno_dir)
        started = time.monotonic()
        directory = ensure_sandbox_cache(args.deno_dir)
    except (SandboxError, OSError, subprocess.SubprocessError) as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        return 1
    if not was_ready:
        check = probe_sandbox(deno_dir=directory)
        if not check.ok:
            _forget(directory)
            print(f"sandbox setup failed: {check.reason}", file=sys.stderr)
            return 1
    paths = sandbox_paths(directory)
    print(f"deno:       {paths.deno_bin}")
    print(f"DENO_DIR:   {paths.deno_dir}")
    print(f"import map: {paths.import_map}")
    print(f"pyodide:    {paths.pyodide_dir}")
    action = "already filled, nothing to do" if was_ready else "filled and self-checked"
    print(f"cache:      {action} ({time.monotonic() - started:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
