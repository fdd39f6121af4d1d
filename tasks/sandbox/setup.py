"""Where the sandbox's Deno cache lives and how it gets filled.

DSPy's ``runner.js`` imports ``readLines`` from deno.land and Pyodide from npm.
deno.land is unreachable here, so an import map (written next to the cache)
points that URL at ``std_io.js`` in this package, and wraps Pyodide with
``pyodide_shim.js``. Pyodide itself comes from the npm registry once, into a
project-controlled ``DENO_DIR``; sandboxes then run with ``--cached-only`` and
no network at all.

Run ``python -m tasks.sandbox.setup`` once per machine (it is idempotent).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from routing.errors import SandboxError
from routing.settings import flagship_home

__all__ = [
    "SandboxPaths",
    "deno_dir",
    "ensure_sandbox_cache",
    "find_deno",
    "flagship_home",
    "is_cache_ready",
    "sandbox_paths",
    "INSTALL_HINT",
]

log = logging.getLogger(__name__)

#: The import in DSPy's runner.js that cannot be fetched offline.
STD_IO_URL = "https://deno.land/std@0.186.0/io/mod.ts"
#: Bare specifier the Pyodide shim imports the real Pyodide through.
PYODIDE_ALIAS = "flagship:pyodide"
#: One line telling a user how to get a working sandbox.
INSTALL_HINT = "install it with `pip install deno` and run `python -m tasks.sandbox.setup`"
#: How long `deno cache` may take to download Pyodide from npm.
cache_timeout_s = 300.0

_PACKAGE_DIR = Path(__file__).resolve().parent
_MAP_NAME = "flagship-import-map.json"
_MARKER_NAME = ".flagship-sandbox-ready"


@dataclass(frozen=True)
class SandboxPaths:
    """Everything a sandbox start needs, resolved once."""

    deno_bin: str
    deno_dir: Path
    runner: Path
    import_map: Path
    pyodide_spec: str
    pyodide_dir: Path | None  # None until the cache is filled


def deno_dir() -> Path:
    """The project's DENO_DIR: ``$FLAGSHIP_DENO_DIR``, else ``$FLAGSHIP_HOME/deno``."""
    override = os.environ.get("FLAGSHIP_DENO_DIR")
    return Path(override).expanduser() if override else flagship_home() / "deno"


def find_deno() -> str:
    """``$FLAGSHIP_DENO_BIN``, else the Deno binary from the ``deno`` wheel, else one on PATH."""
    override = os.environ.get("FLAGSHIP_DENO_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise SandboxError(f"FLAGSHIP_DENO_BIN={override} is not an executable deno; {INSTALL_HINT}")
        return override
    try:
        from deno import find_deno_bin

        return str(find_deno_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("deno")
    if not found:
        raise SandboxError(f"no deno executable found; {INSTALL_HINT}")
    return found


def _runner_path() -> Path:
    import dspy.primitives.python_interpreter as interpreter_module

    return Path(interpreter_module.__file__).resolve().parent / "runner.js"


@functools.cache
def _pyodide_spec(runner: Path) -> str:
    match = re.search(r"npm:pyodide@[^\"'/]+/pyodide\.js", runner.read_text())
    if match is None:
        raise SandboxError(f"cannot find the Pyodide import in {runner}; this DSPy version is not supported")
    return match.group(0)


def _write_import_map(directory: Path, pyodide_spec: str) -> Path:
    """Write the import map (only when its content changes, so concurrent starts don't race)."""
    content = json.dumps(
        {
            "imports": {
                STD_IO_URL: (_PACKAGE_DIR / "std_io.js").as_uri(),
                pyodide_spec: (_PACKAGE_DIR / "pyodide_shim.js").as_uri(),
                PYODIDE_ALIAS: pyodide_spec,
            }
        },
        indent=2,
    )
    path = directory / _MAP_NAME
    if not path.exists() or path.read_text() != content:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(content)
        tmp.replace(path)
    return path


def _find_pyodide_dir(directory: Path, pyodide_spec: str) -> Path | None:
    version = pyodide_spec.split("@", 1)[1].split("/", 1)[0]
    for candidate in sorted((directory / "npm").glob(f"*/pyodide/{version}")):
        if (candidate / "pyodide.asm.wasm").is_file():
            return candidate.resolve()
    return None


def sandbox_paths(directory: Path | None = None) -> SandboxPaths:
    """Resolve the binary, runner and cache paths and (re)write the import map."""
    directory = Path(directory or deno_dir()).expanduser().resolve()
    runner = _runner_path()
    spec = _pyodide_spec(runner)
    return SandboxPaths(
        deno_bin=find_deno(),
        deno_dir=directory,
        runner=runner,
        import_map=_write_import_map(directory, spec),
        pyodide_spec=spec,
        pyodide_dir=_find_pyodide_dir(directory, spec),
    )


def _cache_key(paths: SandboxPaths) -> str:
    digest = hashlib.sha256()
    for part in (paths.runner, _PACKAGE_DIR / "std_io.js", _PACKAGE_DIR / "pyodide_shim.js"):
        digest.update(part.read_bytes())
    stat = os.stat(paths.deno_bin)
    return json.dumps({"sources": digest.hexdigest(), "deno": [paths.deno_bin, stat.st_size, stat.st_mtime_ns]})


def is_cache_ready(directory: Path | None = None) -> bool:
    """True when Pyodide is cached and a sandbox started from this exact setup."""
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
    """Fill DENO_DIR with Pyodide and prove a sandbox starts from it; returns DENO_DIR.

    Idempotent: once a marker records this exact runner, shim and Deno binary,
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
    from tasks.sandbox.interpreter import SandboxInterpreter

    interpreter = SandboxInterpreter(deno_dir=paths.deno_dir)
    try:
        output = interpreter.execute("print(6 * 7)")
    finally:
        interpreter.shutdown()
    if str(output).strip() != "42":
        raise SandboxError(f"sandbox self-check printed {output!r} instead of 42")
    (paths.deno_dir / _MARKER_NAME).write_text(_cache_key(paths))
    log.info("sandbox cache ready in %s (%.1f s)", paths.deno_dir, time.monotonic() - started)


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
