"""What benchmarks run in: a Redis server of their own, and CPU-seconds of processes from ``/proc``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from routing.broker.embedded import read_record, stop_server
from routing.settings import Settings

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far (0.0 when it is gone or ``/proc`` is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / _TICKS


def server_pid(settings: Settings) -> int | None:
    """The embedded Valkey server's pid (None with ``REDIS_URL``: a server we cannot see)."""
    if settings.redis_url:
        return None
    record = read_record(settings.home)
    return record.pid if record else None


@dataclass
class CpuMeter:
    """CPU-seconds spent by named groups of processes between ``start()`` and ``stop()``."""

    groups: Mapping[str, Iterable[int | None]]

    def __post_init__(self) -> None:
        self.groups = {name: tuple(pids) for name, pids in self.groups.items()}

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids if pid) for name, pids in self.groups.items()}

    def start(self) -> CpuMeter:
        self._start = self._now()
        return self

    def stop(self) -> dict[str, float]:
        end = self._now()
        return {name: end[name] - self._start[name] for name in end}


@contextmanager
def own_server(settings: Settings) -> Iterator[Settings]:
    """``settings`` with a fresh embedded server (stopped afterwards) unless ``REDIS_URL`` names one.

    Others' workers and benchmarks on the shared embedded server would count in its CPU.
    """
    if settings.redis_url:
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix="flagship-bench-") as tmp:
        try:
            yield replace(settings, home=Path(tmp))
        finally:
            stop_server(Path(tmp))
