"""What the Redis server did between two samples: commands by name, bytes in/out, keys, its CPU-seconds.

Read from the server itself (``INFO commandstats``, ``INFO stats``, ``DBSIZE``) and
``/proc/<pid>/stat``, so every client counts, producers, workers, pulses and Celery's
own housekeeping alike. Commands a Lua script runs count too (Valkey counts them
under their own names, plus one ``evalsha`` for the script). The sampling commands
(``info``, ``dbsize``) are left out of the counts; their bytes cancel out against an
idle baseline that samples the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from redis import Redis

from tasks.bench.helpers.env import cpu_seconds

#: Commands the meter itself sends; never counted.
OWN_COMMANDS = frozenset({"info", "dbsize"})


@dataclass(frozen=True)
class Usage:
    """Server work over ``seconds`` (a difference of two samples, maybe scaled or divided)."""

    commands: dict[str, float] = field(default_factory=dict)
    #: Microseconds the server spent in each command (its own accounting, from ``commandstats``).
    usec: dict[str, float] = field(default_factory=dict)
    net_in: float = 0.0
    net_out: float = 0.0
    keys: float = 0.0
    cpu_s: float = 0.0
    seconds: float = 0.0
    #: Connected clients (at the end, for a sample difference: how many more).
    clients: float = 0.0

    @property
    def total_commands(self) -> float:
        return sum(self.commands.values())

    def scaled(self, factor: float) -> Usage:
        return Usage({k: v * factor for k, v in self.commands.items()}, {k: v * factor for k, v in self.usec.items()},
                     self.net_in * factor, self.net_out * factor, self.keys * factor, self.cpu_s * factor,
                     self.seconds, self.clients * factor)

    def minus(self, other: Usage) -> Usage:
        names = set(self.commands) | set(other.commands)
        return Usage({n: self.commands.get(n, 0.0) - other.commands.get(n, 0.0) for n in names},
                     {n: self.usec.get(n, 0.0) - other.usec.get(n, 0.0) for n in names},
                     self.net_in - other.net_in, self.net_out - other.net_out, self.keys - other.keys,
                     self.cpu_s - other.cpu_s, self.seconds, self.clients - other.clients)

    def per(self, n: float) -> Usage:
        """Divided by ``n`` (calls, workers, seconds)."""
        return self.scaled(1.0 / n)

    def priced(self, window: Usage) -> Usage:
        """The same counts, with server time from each command's average in ``window``.

        A small difference of two whole-server totals (one worker among four) is noisy in
        microseconds, not in counts: pricing the counts is steadier.
        """
        usec = {c: n * window.usec[c] / window.commands[c] for c, n in self.commands.items()
                if n > 0 and window.commands.get(c, 0) > 0 and c in window.usec}
        return replace(self, usec=usec)

    def rounded(self, digits: int = 2, floor: float = 0.005) -> dict[str, float]:
        """Commands by name, largest first, dropping what is noise around zero."""
        items = sorted(self.commands.items(), key=lambda kv: (-kv[1], kv[0]))
        return {name: round(v, digits) for name, v in items if abs(v) >= floor}

    def as_dict(self) -> dict[str, object]:
        return {"commands": self.rounded(3), "total_commands": round(self.total_commands, 3),
                "net_in_bytes": round(self.net_in, 1), "net_out_bytes": round(self.net_out, 1),
                "keys": round(self.keys, 3), "server_cpu_s": self.cpu_s,
                "server_usec": round(sum(self.usec.values()), 2), "seconds": round(self.seconds, 3),
                "clients": round(self.clients, 2)}


@dataclass(frozen=True)
class Sample:
    commands: Counter[str]
    usec: Counter[str]
    net_in: int
    net_out: int
    keys: int
    cpu_s: float
    at: float
    clients: int

    def since(self, before: Sample) -> Usage:
        names = set(self.commands) | set(before.commands)
        return Usage({n: float(self.commands[n] - before.commands[n]) for n in names},
                     {n: float(self.usec[n] - before.usec[n]) for n in names},
                     float(self.net_in - before.net_in), float(self.net_out - before.net_out),
                     float(self.keys - before.keys), self.cpu_s - before.cpu_s, self.at - before.at,
                     float(self.clients - before.clients))


class ServerMeter:
    """Samples one server (``pid``: its process on this machine, for CPU-seconds; None: not counted)."""

    def __init__(self, redis: Redis, pid: int | None) -> None:
        self.redis = redis
        self.pid = pid

    def sample(self) -> Sample:
        pipe = self.redis.pipeline(transaction=False)
        pipe.info("commandstats")
        pipe.info("stats")
        pipe.dbsize()
        pipe.info("clients")
        commandstats, stats, keys, clients = pipe.execute()
        calls: Counter[str] = Counter()
        usec: Counter[str] = Counter()
        for key, value in commandstats.items():
            name = key.removeprefix("cmdstat_")
            if name not in OWN_COMMANDS:
                calls[name], usec[name] = int(value["calls"]), int(value["usec"])
        return Sample(calls, usec, int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"]),
                      int(keys), cpu_seconds(self.pid) if self.pid else 0.0, time.monotonic(),
                      int(clients["connected_clients"]) - 1)  # less the meter's own connection

    def measure(self, fn: Callable[[], object]) -> Usage:
        """What the server did while ``fn`` ran."""
        before = self.sample()
        fn()
        return self.sample().since(before)

    def idle(self, seconds: float) -> Usage:
        return self.measure(lambda: time.sleep(seconds))

    def per_call(self, fn: Callable[[], object], calls: int) -> Usage:
        """``fn`` (which makes ``calls`` calls) minus an idle baseline of the same length, per call."""
        run = self.measure(fn)
        idle = self.idle(run.seconds)
        return run.minus(idle.scaled(run.seconds / max(idle.seconds, 1e-9))).per(calls)
