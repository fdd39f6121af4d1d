"""Fleet-wide LM limits, 429 pauses and budgets, checked before every provider request.

One script per request (``routing/broker/scripts/lm_gate.lua``, one round trip)
checks, in order: the model's pause (set by any worker that got a 429), the
session's and run's budgets (``routing.fleet.usage``), and the model's limits
from ``FLAGSHIP_LM_LIMITS``: ``rpm`` and ``tpm`` as a sliding-window log (no
window of ``FLAGSHIP_LM_LIMIT_WINDOW_S``, 60 s in production, holds more requests
or tokens than allowed; tokens are reserved from an estimate, prompt characters / 4 plus
``max_tokens`` as providers count them, and settled with the provider's reported usage), and
``concurrency`` as leases that run out, so a killed worker's slots come back. When all pass,
it takes them together.

A request without capacity waits on its worker (the call is running, for backpressure)
as long as the script says, then asks again; past its call's deadline (the route's
``deadline``, else ``FLAGSHIP_LM_LIMIT_WAIT_S``) it fails with ``RateLimited``.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis import Redis

from routing.broker.scripts import source
from routing.errors import BudgetExceeded, RateLimited
from routing.fleet import usage
from tasks.lm.governance import GovernorSettings, Limit

__all__ = ["Limiter", "Admission", "pause_key"]

#: How often a request waiting for a concurrency slot asks again (seconds, jittered up to double).
concurrency_poll_s = 0.01
#: A concurrency lease lasts the provider timeout plus this much (a killed worker's slot comes back after it).
lease_margin_s = 10.0
#: The window is kept this much longer (a share of it, at most ``window_guard_max_s``), so requests' trips to the
#: provider (a few ms, more under load) cannot make two windows' requests meet in one window there.
window_guard_share, window_guard_max_s = 0.02, 0.25


def pause_key(model: str) -> str:
    return f"flagship:lm:pause:{model}"


def limit_keys(model: str) -> list[str]:
    base = f"flagship:lm:limit:{model}"
    return [f"{base}:rpm", f"{base}:tpm", f"{base}:tpm:tokens", f"{base}:leases"]


@dataclass
class Admission:
    """A request let through: what to settle when it is done, and how long it waited."""

    request_id: str
    model: str
    limit: Limit | None
    waited_s: float = 0.0

    def settle_args(self, tokens: int) -> tuple[list[str], list[Any]] | None:
        """The settle script's keys and arguments, or None when nothing was taken."""
        if self.limit is None or not (self.limit.tpm or self.limit.concurrency):
            return None
        keys = limit_keys(self.model)
        return ([keys[2], keys[3]],
                [self.request_id, tokens, int(bool(self.limit.tpm)), int(bool(self.limit.concurrency))])


class Limiter:
    def __init__(self, redis: Redis, settings: GovernorSettings, timeout_s: float) -> None:
        self.redis, self.settings = redis, settings
        self.lease_ms = int((timeout_s + lease_margin_s) * 1000)
        window = settings.window_s
        self.window_ms = int(1000 * (window + min(window_guard_max_s, window_guard_share * window)))
        self._gate = redis.register_script(source("lm_gate"))
        self._pause = redis.register_script(source("lm_pause"))
        self.settle_script = redis.register_script(source("lm_settle"))

    def admit(self, model: str, session_id: str | None, run_id: str | None, deadline: float | None,
              estimate: int) -> Admission:
        """Wait for capacity; raises ``BudgetExceeded`` at once, ``RateLimited`` past ``deadline`` (epoch s)."""
        limit = self.settings.limit_for(model)
        admission = Admission(uuid.uuid4().hex, model, limit)
        give_up = time.time() + self.settings.max_wait_s if deadline is None else deadline
        keys = [pause_key(model), usage.session_key(session_id or "-"), usage.run_key(run_id or "-"),
                *limit_keys(model)]
        args = [admission.request_id, estimate if limit and limit.tpm else 0, (limit and limit.rpm) or 0,
                (limit and limit.tpm) or 0, (limit and limit.concurrency) or 0,
                self.window_ms, self.lease_ms, int(session_id is not None), int(run_id is not None)]
        started = time.monotonic()
        while True:
            reply = self._gate(keys, args)
            kind = reply[0]
            if kind == "ok":
                admission.waited_s = time.monotonic() - started
                return admission
            if kind == "budget":
                _, key, spent, budget, what = reply
                scope = ("session " + key.rsplit(":", 1)[-1]) if key.startswith(usage.session_key("")) \
                    else ("run " + key.rsplit(":", 1)[-1])
                raise BudgetExceeded(scope, _shown(spent, what), _shown(budget, what))
            if kind == "never":
                raise RateLimited(model, reply[1])
            wait_s = int(reply[1]) / 1000 or concurrency_poll_s * (1 + random.random())
            if time.time() + wait_s > give_up:
                raise RateLimited(model, f"{reply[2]} (would wait {wait_s:.2f} s more, past the deadline; "
                                         f"waited {time.monotonic() - started:.2f} s)")
            time.sleep(wait_s + random.random() * 0.002)

    def pause(self, model: str, seconds: float) -> None:
        """Hold every worker's requests of ``model`` for ``seconds`` (never shortening a longer pause)."""
        if seconds > 0 and math.isfinite(seconds):
            self._pause([pause_key(model)], [max(1, int(seconds * 1000))])


def _shown(value: str, what: str) -> str:
    number = float(value)
    return f"{number:.6g} USD" if what == "usd" else f"{int(number)} tokens"
