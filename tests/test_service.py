"""examples/service.py under a real uvicorn, driven over HTTP with concurrent requests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import running_service

from tasks.local.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
TICKETS = {
    "outage": "Checkout API returns 502 for all customers since 09:00; the site is down.",
    "billing": "I was charged twice on my last invoice, please refund one charge.",
    "account": "Locked out after the 2FA reset, the password link never arrives.",
}


@pytest.fixture(scope="module")
def service(stack: Stack) -> Iterator[str]:
    with running_service({**os.environ, "REDIS_URL": stack.redis_url}) as url:
        yield url


def test_each_client_gets_its_own_session_and_concurrent_requests_are_classified(service: str) -> None:
    requests = [(f"client-{c}", label, text) for c in range(3) for label, text in TICKETS.items()] * 2

    def post(item: tuple[str, str, str]) -> tuple[str, str, dict]:
        client_id, label, text = item
        reply = httpx.post(f"{service}/clients/{client_id}/tickets", json={"ticket": text}, timeout=60)
        assert reply.status_code == 200, reply.text
        return client_id, label, reply.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, requests))
    assert all(body["category"] == label for _, label, body in answers)
    by_client: dict[str, set[tuple[str, str]]] = {}
    for client_id, _, body in answers:
        by_client.setdefault(client_id, set()).add((body["session"], body["worker"]))
    assert all(len(bound) == 1 for bound in by_client.values())  # one session (one worker) per client
    assert len({next(iter(b))[0] for b in by_client.values()}) == 3


def test_bad_input_is_a_clean_http_error_and_closing_a_client_ends_its_session(service: str) -> None:
    assert httpx.post(f"{service}/clients/x/tickets", json={"ticket": ""}, timeout=30).status_code == 422
    first = httpx.post(f"{service}/clients/closer/tickets", json={"ticket": TICKETS["billing"]}, timeout=60).json()
    assert httpx.delete(f"{service}/clients/closer", timeout=30).json() == {"closed": True}
    again = httpx.post(f"{service}/clients/closer/tickets", json={"ticket": TICKETS["billing"]}, timeout=60).json()
    assert again["session"] != first["session"] and again["category"] == "billing"
