"""Clean start-up failures, typed broker errors, ``rediss://`` and ACL users end to end, Flower's passwords.

A broker that cannot be used (wrong password, unreachable, TLS mismatch) makes a
worker exit within 15 s with one line naming the cause, password masked; the
producer gets ``ServerUnavailable``. TLS runs through a TLS-terminating proxy in
front of the test server (the bundled Valkey has no TLS).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from broker_proxy import BrokerProxy, self_signed_cert
from custom_workers import spawn_worker
from redis import Redis

from routing import Client, Settings
from routing.errors import ServerUnavailable
from tasks.local.stack import Stack, WorkerProcess
from tasks.worker.refusal import EXIT_UNAVAILABLE

POOL = "door_pool"
ROOT = Path(__file__).resolve().parents[2]
#: A broken broker must end a worker's start within this long.
startup_limit_s = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server_port(stack: Stack) -> int:
    port = urlsplit(stack.redis_url).port
    assert port is not None
    return port


@pytest.fixture
def acl_user(stack: Stack) -> Iterator[tuple[str, str]]:
    """A server user (not ``default``) with a password; deleted after the test."""
    admin = Redis.from_url(stack.redis_url)
    user, password = f"h4-{uuid.uuid4().hex[:8]}", secrets.token_hex(8)
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    yield user, password
    admin.execute_command("ACL", "DELUSER", user)
    admin.close()


@pytest.fixture
def tls_proxy(server_port: int, tmp_path: Path) -> Iterator[tuple[BrokerProxy, Path]]:
    cert, key = self_signed_cert(tmp_path)
    proxy = BrokerProxy(server_port, tls=(cert, key))
    yield proxy, cert
    proxy.close()


@pytest.fixture
def door_workers(stack: Stack) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        worker = spawn_worker(stack, POOL, f"door-{uuid.uuid4().hex[:6]}", env=env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _output(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_tail(20_000).splitlines() if line.strip()]


def assert_refused_in_one_line(worker: WorkerProcess, *expected: str, secret: str | None = None) -> str:
    """The worker exits non-zero within the limit, printing one line that holds every ``expected`` text."""
    started = time.monotonic()
    rc = worker.proc.wait(startup_limit_s + 5)
    assert time.monotonic() - started < startup_limit_s
    lines = _output(worker)
    assert rc == EXIT_UNAVAILABLE, lines
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines
    if secret:
        assert secret not in lines[0]
    return lines[0]


# -- workers that cannot use their broker ---------------------------------------------------------


def test_a_worker_with_a_wrong_password_exits_at_once_naming_the_cause_with_the_password_masked(
    server_port: int, acl_user: tuple[str, str], door_workers: Callable[..., WorkerProcess],
) -> None:
    user, _ = acl_user
    wrong = "not-the-password-" + secrets.token_hex(4)
    worker = door_workers({"REDIS_URL": f"redis://{user}:{wrong}@127.0.0.1:{server_port}/0"})
    assert_refused_in_one_line(worker, "authentication failed", f"redis://{user}:***@127.0.0.1:{server_port}/0",
                               worker.node, secret=wrong)


def test_a_plain_celery_worker_with_a_wrong_password_exits_too(
    stack: Stack, server_port: int, acl_user: tuple[str, str],
) -> None:
    user, _ = acl_user
    wrong = "not-the-password-" + secrets.token_hex(4)
    env = {**stack.child_env(), "REDIS_URL": f"redis://{user}:{wrong}@127.0.0.1:{server_port}/0"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "threads", "-c", "1",
                           "-Q", f"{POOL}", "-n", f"plain-{uuid.uuid4().hex[:6]}@%h", "--without-mingle",
                           "--without-gossip", "-l", "info"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < startup_limit_s + 10  # interpreter and Celery start included
    output = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == EXIT_UNAVAILABLE, output
    causes = [line for line in output if "cannot start" in line]
    assert len(causes) == 1 and "authentication failed" in causes[0] and f"{user}:***@" in causes[0], output
    assert "Traceback" not in done.stderr and wrong not in done.stdout + done.stderr


def test_a_worker_whose_broker_is_unreachable_exits_at_once(door_workers: Callable[..., WorkerProcess]) -> None:
    port = _free_port()
    worker = door_workers({"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert_refused_in_one_line(worker, "connection refused", f"127.0.0.1:{port}")


def test_a_tls_client_against_a_plain_server_exits_at_once(
    server_port: int, door_workers: Callable[..., WorkerProcess],
) -> None:
    worker = door_workers({"REDIS_URL": f"rediss://127.0.0.1:{server_port}/0"})
    assert_refused_in_one_line(worker, "TLS failed", f"rediss://127.0.0.1:{server_port}/0")


def test_a_plain_client_against_a_tls_server_exits_at_once(
    tls_proxy: tuple[BrokerProxy, Path], door_workers: Callable[..., WorkerProcess],
) -> None:
    proxy, _ = tls_proxy
    worker = door_workers({"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"})
    assert_refused_in_one_line(worker, "cannot start", f"redis://127.0.0.1:{proxy.port}/0")


def test_flagship_status_with_a_wrong_password_prints_one_line(
    stack: Stack, server_port: int, acl_user: tuple[str, str],
) -> None:
    user, _ = acl_user
    wrong = "not-the-password-" + secrets.token_hex(4)
    env = {**stack.child_env(), "REDIS_URL": f"redis://{user}:{wrong}@127.0.0.1:{server_port}/0"}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "status"], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == EXIT_UNAVAILABLE
    assert len(lines) == 1 and "authentication failed" in lines[0] and f"{user}:***@" in lines[0], lines
    assert wrong not in lines[0]


# -- producers get ServerUnavailable ---------------------------------------------------------------


def test_a_client_with_a_wrong_password_raises_server_unavailable_with_the_password_masked(
    server_port: int, acl_user: tuple[str, str],
) -> None:
    user, _ = acl_user
    wrong = "not-the-password-" + secrets.token_hex(4)
    with pytest.raises(ServerUnavailable) as raised:
        Client(f"redis://{user}:{wrong}@127.0.0.1:{server_port}/0", Settings.from_env())
    assert raised.value.url == f"redis://{user}:***@127.0.0.1:{server_port}/0"
    assert raised.value.reason.startswith("authentication failed")
    assert wrong not in str(raised.value)


def test_calls_raise_server_unavailable_once_the_broker_is_gone(
    stack: Stack, server_port: int, door_workers: Callable[..., WorkerProcess],
) -> None:
    worker = door_workers({})
    stack.wait_ready([worker])
    proxy = BrokerProxy(server_port)
    client = Client(f"redis://127.0.0.1:{proxy.port}/0", Settings.from_env())
    try:
        session = client.session(POOL)
        assert session.call("ping", timeout_s=30)["node"] == worker.node
        proxy.close()
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as raised:
            session.call("ping", timeout_s=30)
        assert time.monotonic() - started < 15
        assert raised.value.url == f"redis://127.0.0.1:{proxy.port}/0"
        with pytest.raises(ServerUnavailable):
            client.session(POOL)
    finally:
        proxy.close()
        client.close()


# -- rediss:// and ACL users end to end ------------------------------------------------------------


def test_a_worker_and_a_producer_over_tls_run_a_session(
    stack: Stack, tls_proxy: tuple[BrokerProxy, Path], door_workers: Callable[..., WorkerProcess],
) -> None:
    proxy, cert = tls_proxy
    # The worker names its CA with FLAGSHIP_REDIS_CA_FILE, the producer in the URL: both are understood.
    worker = door_workers({"REDIS_URL": f"rediss://127.0.0.1:{proxy.port}/0", "FLAGSHIP_REDIS_CA_FILE": str(cert)})
    stack.wait_ready([worker])
    connections_before = proxy.connections
    client = Client(f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}", Settings.from_env())
    try:
        session = client.session(POOL)
        assert session.worker == worker.node
        first, second = (session.call("ping", timeout_s=30) for _ in range(2))
        assert first["pid"] == worker.pid and second["seq"] == first["seq"] + 1
        session.close()
    finally:
        client.close()
    assert proxy.connections > connections_before


def test_a_worker_and_a_producer_run_a_session_as_an_acl_user(
    stack: Stack, server_port: int, acl_user: tuple[str, str], door_workers: Callable[..., WorkerProcess],
) -> None:
    user, password = acl_user
    url = f"redis://{user}:{password}@127.0.0.1:{server_port}/0"
    worker = door_workers({"REDIS_URL": url})
    stack.wait_ready([worker])
    admin = Redis.from_url(stack.redis_url, decode_responses=True)
    clients = admin.client_list()
    assert any(c.get("user") == user for c in clients)  # the worker (and its pulse) log in as the ACL user
    admin.close()
    client = Client(url, Settings.from_env())
    try:
        session = client.session(POOL)
        assert session.call("ping", timeout_s=30)["pid"] == worker.pid
        session.close()
    finally:
        client.close()


# -- Flower ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["ops:", "ops", ":pw", "admin:s3cret,ops: "])
def test_flower_refuses_a_credential_without_a_user_or_a_password(auth: str) -> None:
    env = {**os.environ, "FLOWER_BASIC_AUTH": auth}
    env.pop("FLAGSHIP_FLOWER_UNAUTHENTICATED", None)
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "run_flower.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1 and "refusing to start Flower" in lines[0], lines
    assert "s3cret" not in lines[0]


@pytest.mark.parametrize("flag", ["--basic_auth=ops:", "--unauthenticated_api", "--unauthenticated_api=true"])
def test_flower_refuses_command_line_flags_that_would_bypass_its_auth_checks(flag: str) -> None:
    env = {**os.environ, "FLOWER_BASIC_AUTH": "ops:s3cret"}
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "run_flower.py"), flag], env=env,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1 and "bypass the authentication checks" in lines[0], lines
