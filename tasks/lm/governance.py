"""How a worker governs its LM traffic: the fleet cache and fleet-wide limits, read once at start.

- ``FLAGSHIP_LM_CACHE``: ``fleet`` (default: one cache for every worker of the broker),
  ``local`` (DSPy's own per-process cache; ``1``/``true`` mean it too), ``off`` (``0``/``false``).
- ``FLAGSHIP_LM_CACHE_TTL_S`` (7 days), ``FLAGSHIP_LM_CACHE_MAX_MB`` (256),
  ``FLAGSHIP_LM_CACHE_URL`` (another Redis for the cache; default: the worker's broker),
  ``FLAGSHIP_LM_CACHE_MEMORY_ENTRIES`` (10,000: DSPy's in-memory tier above the fleet tier).
- ``FLAGSHIP_LM_LIMITS``: JSON (inline, or the path of a file holding it) mapping a model
  string, exact or a prefix ending in ``*``, to ``{"rpm": N, "tpm": N, "concurrency": N}``.
  Each model matching a prefix gets the limits on its own; an exact entry wins over a prefix,
  the longest prefix over shorter ones.
- ``FLAGSHIP_LM_LIMIT_WINDOW_S``: the window ``rpm`` and ``tpm`` count in. 60 s in production
  (per minute, as providers count); tests shorten it.
- ``FLAGSHIP_LM_LIMIT_WAIT_S`` (60): how long a call without a deadline may wait for capacity
  (a call whose route carries a ``deadline`` waits at most until then), else ``RateLimited``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing.settings import env_number

__all__ = ["CACHE_MODES", "Limit", "GovernorSettings", "parse_limits"]

CACHE_MODES = ("fleet", "local", "off")
_ALIASES = {"1": "local", "true": "local", "yes": "local", "on": "local",
            "0": "off", "false": "off", "no": "off", "none": "off", "": "fleet"}


@dataclass(frozen=True)
class Limit:
    """One model's fleet-wide limits (None: not limited on that axis)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class GovernorSettings:
    cache: str = "fleet"
    cache_ttl_s: float = 7 * 24 * 3600.0
    cache_max_mb: float = 256.0
    cache_url: str | None = None
    cache_memory_entries: int = 10_000
    #: ``(pattern, Limit)`` pairs: exact model strings, or prefixes ending in ``*``.
    limits: tuple[tuple[str, Limit], ...] = ()
    window_s: float = 60.0
    max_wait_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GovernorSettings:
        env = os.environ if env is None else env
        raw_mode = (env.get("FLAGSHIP_LM_CACHE") or "").strip().lower()
        mode = _ALIASES.get(raw_mode, raw_mode)
        if mode not in CACHE_MODES:
            raise ValueError(f"FLAGSHIP_LM_CACHE={raw_mode!r} must be one of {', '.join(CACHE_MODES)}")
        settings = cls(
            cache=mode,
            cache_ttl_s=env_number(env, "FLAGSHIP_LM_CACHE_TTL_S", cls.cache_ttl_s, float),
            cache_max_mb=env_number(env, "FLAGSHIP_LM_CACHE_MAX_MB", cls.cache_max_mb, float),
            cache_url=(env.get("FLAGSHIP_LM_CACHE_URL") or "").strip() or None,
            cache_memory_entries=env_number(env, "FLAGSHIP_LM_CACHE_MEMORY_ENTRIES", cls.cache_memory_entries, int),
            limits=parse_limits(env.get("FLAGSHIP_LM_LIMITS") or ""),
            window_s=env_number(env, "FLAGSHIP_LM_LIMIT_WINDOW_S", cls.window_s, float),
            max_wait_s=env_number(env, "FLAGSHIP_LM_LIMIT_WAIT_S", cls.max_wait_s, float),
        )
        for name, value in (("FLAGSHIP_LM_CACHE_TTL_S", settings.cache_ttl_s),
                            ("FLAGSHIP_LM_CACHE_MAX_MB", settings.cache_max_mb),
                            ("FLAGSHIP_LM_CACHE_MEMORY_ENTRIES", settings.cache_memory_entries),
                            ("FLAGSHIP_LM_LIMIT_WINDOW_S", settings.window_s)):
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if settings.max_wait_s < 0:
            raise ValueError(f"FLAGSHIP_LM_LIMIT_WAIT_S={settings.max_wait_s!r} must be >= 0")
        return settings

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_mb * 1024 * 1024)

    def limit_for(self, model: str) -> Limit | None:
        """The limits of ``model``: its exact entry, else the longest matching prefix, else None."""
        best: tuple[int, Limit] | None = None
        for pattern, limit in self.limits:
            if pattern == model:
                return limit
            if pattern.endswith("*") and model.startswith(pattern[:-1]):
                if best is None or len(pattern) > best[0]:
                    best = (len(pattern), limit)
        return None if best is None else best[1]


def _limit(pattern: str, raw: Any) -> Limit:
    if not isinstance(raw, dict) or not raw or set(raw) - {"rpm", "tpm", "concurrency"}:
        raise ValueError(f"FLAGSHIP_LM_LIMITS[{pattern!r}] must be an object of rpm, tpm, concurrency, got {raw!r}")
    for name, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"FLAGSHIP_LM_LIMITS[{pattern!r}].{name} must be a positive integer, got {value!r}")
    return Limit(raw.get("rpm"), raw.get("tpm"), raw.get("concurrency"))


def parse_limits(text: str) -> tuple[tuple[str, Limit], ...]:
    """``FLAGSHIP_LM_LIMITS``: inline JSON or a file path; a clear ``ValueError`` for anything else."""
    text = text.strip()
    if not text:
        return ()
    if not text.startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ValueError(f"FLAGSHIP_LM_LIMITS: cannot read {text!r} ({exc.strerror})") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"FLAGSHIP_LM_LIMITS is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("FLAGSHIP_LM_LIMITS must be a JSON object of model -> limits")
    for pattern in raw:
        if not pattern or "*" in pattern[:-1]:
            raise ValueError(f"FLAGSHIP_LM_LIMITS: {pattern!r} must be a model string or a prefix ending in *")
    return tuple((pattern, _limit(pattern, value)) for pattern, value in raw.items())
