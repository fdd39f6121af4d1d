"""Sandbox settings, read from the environment only when ``from_env()`` is called."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from routing.settings import env_number, flagship_home


@dataclass(frozen=True)
class SandboxSettings:
    #: The project's DENO_DIR (Pyodide cache, import map): ``$FLAGSHIP_DENO_DIR``, else ``$FLAGSHIP_HOME/deno``.
    deno_dir: Path
    #: A Deno binary to use instead of the ``deno`` wheel's (``$FLAGSHIP_DENO_BIN``).
    deno_bin: str | None = None
    #: Sandboxes kept started per worker; None: one per worker thread.
    pool_size: int | None = None
    #: Each ``execute`` is killed after this long.
    execute_timeout_s: float = 30.0
    #: V8 heap cap of each sandbox (JS objects; Pyodide's WebAssembly memory is not in it).
    heap_mb: int = 512
    #: WebAssembly memory cap of each sandbox, where Pyodide's Python heap lives
    #: (``$FLAGSHIP_SANDBOX_WASM_MB``). Pyodide starts with 20 MB (it cannot start
    #: under ~24); a 10 MB context split and counted over 8 RLM iterations peaked
    #: at ~250 MB. Code that needs more gets ``MemoryError``.
    wasm_mb: int = 512

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SandboxSettings:
        env = os.environ if env is None else env
        override = (env.get("FLAGSHIP_DENO_DIR") or "").strip()
        size = env_number(env, "FLAGSHIP_SANDBOX_POOL_SIZE", 0, int)
        return cls(
            deno_dir=Path(override).expanduser() if override else flagship_home(dict(env)) / "deno",
            deno_bin=(env.get("FLAGSHIP_DENO_BIN") or "").strip() or None,
            pool_size=size or None,
            execute_timeout_s=env_number(env, "FLAGSHIP_SANDBOX_TIMEOUT_S", cls.execute_timeout_s, float),
            heap_mb=env_number(env, "FLAGSHIP_SANDBOX_HEAP_MB", cls.heap_mb, int),
            wasm_mb=env_number(env, "FLAGSHIP_SANDBOX_WASM_MB", cls.wasm_mb, int),
        )
