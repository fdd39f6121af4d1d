"""Runtime settings, read from the environment only when asked (never at import)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

N = TypeVar("N", int, float)


def env_number(env: Mapping[str, str], name: str, default: N, kind: type[N]) -> N:
    """``env[name]`` as a finite number >= 0 of ``kind`` (int or float), ``default`` when unset or empty."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{name}={raw!r} must be a finite number >= 0")
    return value


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and status output (in each URL of a ``;`` list: Sentinel)."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def flagship_home(env: dict[str, str] | None = None) -> Path:
    """Where the embedded server, its address file and the sandbox cache live."""
    env = dict(os.environ) if env is None else env
    if env.get("FLAGSHIP_HOME"):
        return Path(env["FLAGSHIP_HOME"]).expanduser()
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "flagship"


@dataclass(frozen=True)
class Settings:
    #: Explicit Redis URL; ``None`` means the embedded server recorded under ``home``.
    redis_url: str | None = None
    home: Path = field(default_factory=flagship_home)
    #: A worker is live while its heartbeat key exists; it renews it every ``heartbeat_interval_s``.
    heartbeat_ttl_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    #: How often a client refreshes its view of the workers it routes to.
    watch_interval_s: float = 0.25
    #: Session records expire after this long without a call.
    session_ttl_s: float = 3600.0
    #: Redis transport: an un-acked message returns to its queue after this long.
    visibility_timeout_s: float = 3600.0
    #: JSON file or inline JSON overriding the pool table.
    pools_config: str | None = None
    #: A call argument at least this big (bytes of JSON) travels by reference: a Redis key, not the message.
    claim_threshold_bytes: int = 64 * 1024
    #: Largest module input field (and text argument) a call may carry, in bytes (UTF-8 of a string, else JSON).
    max_input_bytes: int = 1 << 20
    #: Largest ``session.context(text)`` (and any other single argument), in bytes.
    max_context_bytes: int = 64 << 20

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        ttl = env_number(env, "FLAGSHIP_HEARTBEAT_TTL_S", cls.heartbeat_ttl_s, float)
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            home=flagship_home(env),
            heartbeat_ttl_s=ttl,
            heartbeat_interval_s=env_number(env, "FLAGSHIP_HEARTBEAT_INTERVAL_S", min(ttl / 4, 1.0), float),
            watch_interval_s=env_number(env, "FLAGSHIP_WATCH_INTERVAL_S", cls.watch_interval_s, float),
            session_ttl_s=env_number(env, "FLAGSHIP_SESSION_TTL_S", cls.session_ttl_s, float),
            visibility_timeout_s=env_number(env, "FLAGSHIP_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, float),
            pools_config=env.get("FLAGSHIP_POOLS") or None,
            claim_threshold_bytes=env_number(env, "FLAGSHIP_CLAIM_THRESHOLD_BYTES", cls.claim_threshold_bytes, int),
            max_input_bytes=env_number(env, "FLAGSHIP_MAX_INPUT_BYTES", cls.max_input_bytes, int),
            max_context_bytes=env_number(env, "FLAGSHIP_MAX_CONTEXT_BYTES", cls.max_context_bytes, int),
        )
