"""examples/service.py streaming: its Server-Sent Events endpoint over HTTP, and its page in headless Chromium.

A real uvicorn serves the example against one real worker of ``page_pool`` whose offline LM pauses
before each piece it streams (``FLAGSHIP_OFFLINE_CHUNK_DELAY_S``), so an answer takes long enough to
watch it grow. The page test drives Chromium over the DevTools protocol and saves the page, mid-answer,
as ``docs/streaming-page.png`` (refreshed with ``FLAGSHIP_UPDATE_DOCS=1``, or when missing).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from chromium import chromium_binary, chromium_install_timeout_s, devtools, png_size_and_colours
from helpers import running_service, wait_until

from routing import names
from tasks.local.stack import Stack, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "streaming-page.png"
POOL = "page_pool"
#: The offline LM's pause before each streamed word: a triage answer of ~40 pieces takes ~2 s.
CHUNK_DELAY_S = 0.05
TICKET = "I was charged twice on my last invoice, please refund one charge."
FIELDS = ("category", "urgency", "action")


@pytest.fixture(scope="module")
def page_worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = stack.start_worker(POOL, env={"FLAGSHIP_OFFLINE_CHUNK_DELAY_S": str(CHUNK_DELAY_S)})
    yield worker
    worker.stop()


def service_of(stack: Stack, pool: str) -> AbstractContextManager[str]:
    return running_service({**stack.child_env(), "FLAGSHIP_SERVICE_POOL": pool})


@pytest.fixture(scope="module")
def service(stack: Stack, page_worker: WorkerProcess) -> Iterator[str]:
    with service_of(stack, POOL) as url:
        yield url


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a ``text/event-stream`` response, as they arrive (comments skipped)."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def stream_url(service: str, client: str, ticket: str) -> str:
    return f"{service}/clients/{client}/tickets/stream?{urllib.parse.urlencode({'ticket': ticket})}"


def test_the_sse_endpoint_sends_chunks_as_they_come_then_done_and_the_chunks_join_to_the_prediction(
    service: str,
) -> None:
    received: list[tuple[str, dict[str, Any], float]] = []
    with httpx.stream("GET", stream_url(service, "sse", TICKET), timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = [(event, data, time.monotonic()) for event, data in events(response)]
    kinds = [event for event, _, _ in received]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    chunks = [data for event, data, _ in received if event == "chunk"]
    done = received[-1][1]
    assert len(chunks) >= 3 and set(done) == {"prediction", "call_id", "session", "worker"}
    assert done["worker"].startswith("page-")  # the slow worker of page_pool
    assert {c["call_id"] for c in chunks} == {done["call_id"]}
    for field in FIELDS:
        assert "".join(c["text"] for c in chunks if c["field"] == field) == done["prediction"][field]
    assert done["prediction"]["category"] == "billing"
    # Chunks arrived over time, not all at once at the end: the offline LM paused before each piece.
    first_chunk = next(at for event, _, at in received if event == "chunk")
    assert received[-1][2] - first_chunk >= CHUNK_DELAY_S * (len(chunks) - 1) * 0.8


def test_bad_input_is_a_422_and_a_pool_without_workers_is_an_error_event(stack: Stack, service: str) -> None:
    assert httpx.get(stream_url(service, "sse", ""), timeout=30).status_code == 422
    assert httpx.get(stream_url(service, "sse", "x" * 20_001), timeout=30).status_code == 422
    with service_of(stack, "rlm_empty_pool") as nowhere:  # a pool of the test table no worker serves
        with httpx.stream("GET", stream_url(nowhere, "sse", TICKET), timeout=60) as response:
            received = list(events(response))
    assert len(received) == 1 and received[0][0] == "error"
    assert received[0][1]["type"] == "NoCapableWorker"
    assert "rlm_empty_pool" in received[0][1]["message"]


def test_a_client_that_disconnects_mid_answer_cancels_its_call(stack: Stack, service: str) -> None:
    with httpx.stream("GET", stream_url(service, "leaver", TICKET), timeout=60) as response:
        first = next(data for event, data in events(response) if event == "chunk")
    # The service's stream closed with the connection, which cancelled the call. The session's calls run one at
    # a time, in order: once its next call is answered, the cancelled one is over on the worker.
    after = httpx.post(f"{service}/clients/leaver/tickets", json={"ticket": TICKET}, timeout=60)
    assert after.status_code == 200 and after.json()["category"] == "billing"
    call_id = first["call_id"]
    meta = str(wait_until(lambda: stack.redis.get(f"celery-task-meta-{call_id}"), 20, what="the call's result"))
    assert '"REVOKED"' in meta or "CallCancelled" in meta, meta
    entries = stack.redis.xrange(names.call_stream(call_id))
    assert entries and all('"end"' not in fields["e"] for _, fields in entries)  # it never finished


#: The page's state, read in one round trip: its answer's length now, and what it recorded.
PAGE_STATE = """JSON.stringify({state: document.body.dataset.state, now: answerLength(),
    lengths: JSON.parse(document.body.dataset.lengths), streamed: document.body.dataset.streamed || null,
    final: document.body.dataset.final || null, status: document.getElementById("status").textContent})"""


@pytest.mark.timeout(chromium_install_timeout_s + 120)
def test_the_page_shows_the_answer_growing_in_headless_chromium_and_is_saved_as_docs_streaming_page_png(
    service: str, tmp_path: Path,
) -> None:
    binary = chromium_binary()
    seen: list[tuple[float, int]] = []  # (when, the answer's length) while the page said it was streaming
    shot = tmp_path / "streaming-page.png"
    with devtools(binary, window=(1100, 440)) as page:
        page.navigate(f"{service}/?{urllib.parse.urlencode({'ticket': TICKET})}")
        deadline = time.monotonic() + 60
        while (state := json.loads(page.evaluate(PAGE_STATE)))["state"] in ("streaming", "idle"):
            assert time.monotonic() < deadline, f"the page never finished: {state}"
            if state["state"] == "streaming" and (not seen or state["now"] != seen[-1][1]):
                seen.append((time.monotonic(), state["now"]))
            if len(seen) == 5 and not shot.exists():  # mid-answer: what the README shows
                page.screenshot(shot)
            time.sleep(0.01)
        if not shot.exists():  # the answer came in fewer steps than that (a loaded machine): the whole of it
            page.screenshot(shot)
    assert state["state"] == "done", state
    lengths, streamed, final = state["lengths"], json.loads(state["streamed"]), json.loads(state["final"])
    # The page's own record: the answer grew with each chunk event.
    assert len(lengths) >= 3 and lengths == sorted(set(lengths)), lengths
    # What this test saw from outside, over time: at least three ever longer answers before the end.
    grown = [n for _, n in seen if n > 0]
    assert len(grown) >= 3 and grown == sorted(grown), seen
    assert seen[-1][0] - seen[0][0] > CHUNK_DELAY_S, seen
    # The text that arrived in chunks is exactly the final prediction.
    assert {f: streamed[f] for f in FIELDS} == {f: final[f] for f in FIELDS}
    assert final["category"] == "billing" and state["status"].startswith("Done on page-")
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == (1100, 440) and colours > 30, f"screenshot looks blank ({colours} colours)"
    if os.environ.get("FLAGSHIP_UPDATE_DOCS") == "1" or not SCREENSHOT.exists():
        shutil.copyfile(shot, SCREENSHOT)
