"""Where a sandbox's pieces are: the Deno binary, DSPy's runner.js, the project's DENO_DIR and its import map.

DSPy's ``runner.js`` imports ``readLines`` from deno.land and Pyodide from npm.
deno.land is unreachable here, so an import map (written into DENO_DIR) points
that URL at ``std_io.js`` in this package and wraps Pyodide with
``pyodide_shim.js``. Everything here reads the environment only through
:class:`~tasks.sandbox.settings.SandboxSettings`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from routing.errors import SandboxError
from tasks.sandbox.settings import SandboxSettings

__all__ = [
    "INSTALL_HINT",
    "PYODIDE_SHIM_JS",
    "STD_IO_JS",
    "SandboxPaths",
    "deno_dir",
    "find_deno",
    "sandbox_paths",
]

#: One line telling a user how to get a working sandbox.
INSTALL_HINT = "install it with `pip install deno` and run `python -m tasks.sandbox.setup`"
#: The import in DSPy's runner.js that cannot be fetched offline.
STD_IO_URL = "https://deno.land/std@0.186.0/io/mod.ts"
#: Bare specifier the Pyodide shim imports the real Pyodide through.
PYODIDE_ALIAS = "flagship:pyodide"

_PACKAGE_DIR = Path(__file__).resolve().parent
#: What the import map redirects deno.land's std/io to.
STD_IO_JS = _PACKAGE_DIR / "std_io.js"
#: What the import map puts in front of Pyodide.
PYODIDE_SHIM_JS = _PACKAGE_DIR / "pyodide_shim.js"
_MAP_NAME = "flagship-import-map.json"


@dataclass(frozen=True)
class SandboxPaths:
    """Everything a sandbox start needs, resolved once."""

    deno_bin: str
    deno_dir: Path
    runner: Path
    import_map: Path
    pyodide_spec: str
    pyodide_dir: Path | None  # None until the cache is filled


def deno_dir(settings: SandboxSettings | None = None) -> Path:
    """The project's DENO_DIR: ``$FLAGSHIP_DENO_DIR``, else ``$FLAGSHIP_HOME/deno``."""
    return (settings or SandboxSettings.from_env()).deno_dir


def find_deno(settings: SandboxSettings | None = None) -> str:
    """``$FLAGSHIP_DENO_BIN``, else the Deno binary from the ``deno`` wheel, else one on PATH."""
    override = (settings or SandboxSettings.from_env()).deno_bin
    if override:
        if not os.access(override, os.X_OK):
            raise SandboxError(f"FLAGSHIP_DENO_BIN={override} is not an executable deno; {INSTALL_HINT}")
        return override
    try:
        from deno import find_deno_bin  # optional dependency: the `deno` wheel

        return str(find_deno_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("deno")
    if not found:
        raise SandboxError(f"no deno executable found; {INSTALL_HINT}")
    return found


def _runner_path() -> Path:
    # Imported on first use, not at module import: the worker settings and the
    # test fixtures import this module and should not load DSPy for it.
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
                STD_IO_URL: STD_IO_JS.as_uri(),
                pyodide_spec: PYODIDE_SHIM_JS.as_uri(),
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


def sandbox_paths(directory: Path | None = None, settings: SandboxSettings | None = None) -> SandboxPaths:
    """Resolve the binary, runner and cache paths and (re)write the import map."""
    settings = settings or SandboxSettings.from_env()
    directory = Path(directory or settings.deno_dir).expanduser().resolve()
    runner = _runner_path()
    spec = _pyodide_spec(runner)
    return SandboxPaths(
        deno_bin=find_deno(settings),
        deno_dir=directory,
        runner=runner,
        import_map=_write_import_map(directory, spec),
        pyodide_spec=spec,
        pyodide_dir=_find_pyodide_dir(directory, spec),
    )
