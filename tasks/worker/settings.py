"""Everything a worker reads from its environment, in one value handed to the runtime and the operations."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from routing.fleet.pulse import default_stall_s
from routing.settings import Settings, env_number
from tasks.lm.provider import LMSettings
from tasks.sandbox.settings import SandboxSettings
from tasks.worker.ref_store import default_max_refs


@dataclass(frozen=True)
class WorkerSettings:
    routing: Settings = field(default_factory=Settings)
    lm: LMSettings = field(default_factory=LMSettings)
    sandbox: SandboxSettings = field(default_factory=lambda: SandboxSettings.from_env({}))
    max_refs: int = default_max_refs
    #: The pool this worker serves (``FLAGSHIP_POOL``); None: the one whose queue is on the command line.
    pool: str | None = None
    #: Keep Celery's per-task INFO lines (``FLAGSHIP_TASK_LOG=1``; ~0.3 ms of worker CPU per call at ``-l info``).
    task_log: bool = False
    #: A worker whose heartbeat thread has not beaten this long (hung, not busy) stops being live
    #: (``FLAGSHIP_STALL_S``).
    stall_s: float = default_stall_s

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = dict(os.environ) if env is None else dict(env)
        return cls(
            routing=Settings.from_env(env),
            lm=LMSettings.from_env(env),
            sandbox=SandboxSettings.from_env(env),
            max_refs=env_number(env, "FLAGSHIP_MAX_REFS", default_max_refs, int),
            pool=(env.get("FLAGSHIP_POOL") or "").strip() or None,
            task_log=(env.get("FLAGSHIP_TASK_LOG") or "").strip().lower() in ("1", "true", "yes", "on"),
            stall_s=env_number(env, "FLAGSHIP_STALL_S", default_stall_s, float),
        )

    def __post_init__(self) -> None:
        if not self.stall_s > 0:
            raise ValueError(f"FLAGSHIP_STALL_S={self.stall_s!r} must be > 0")
