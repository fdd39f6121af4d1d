"""A small async service in front of the triage pool (FastAPI; ``pip install -e '.[service]'``).

Each client of the service gets its own triage session (kept while it keeps
calling, closed with ``DELETE /clients/{client_id}``); tickets are classified on
the worker that holds that session's ``Predict``. Waiting for a worker costs the
event loop nothing: ``await module.acall(...)`` holds no thread per request.

    REDIS_URL=redis://localhost:6379/0 uvicorn examples.service:app --port 8000
    curl -X POST localhost:8000/clients/acme/tickets -H 'content-type: application/json' \\
         -d '{"ticket": "I was charged twice on my last invoice"}'

The answer can also stream as the LM writes it (Server-Sent Events, ``module.astream``):
``GET /clients/{client_id}/tickets/stream?ticket=...`` sends ``chunk`` events
(``{"field", "text", "call_id"}``), ``status`` events, then one ``done`` event (the
prediction's fields, session and worker) or one ``error`` event (``{"type", "message"}``);
a client that disconnects cancels its call. ``GET /`` is a small page that shows it
(plain HTML and ``EventSource``). ``FLAGSHIP_SERVICE_POOL`` names the pool (default ``triage_pool``).

    curl -N 'localhost:8000/clients/acme/tickets/stream?ticket=Checkout+returns+502'
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from routing import Client, Session, StreamChunk, StreamStatus
from routing.errors import FlagshipError, InvalidArgument, SessionWorkerUnavailable
from routing.producer.handles import ModuleRef

TRIAGE = "ticket -> category, urgency, action"
#: The page ``GET /`` serves: a ticket box and the answer appearing as it streams.
PAGE = Path(__file__).with_name("triage_page.html")


class Ticket(BaseModel):
    ticket: str = Field(min_length=1, max_length=20_000)


@dataclass
class Triage:
    session: Session
    module: ModuleRef


class Service:
    """One producer client; one triage session (and its ``Predict``) per service client."""

    def __init__(self) -> None:
        self.client = Client.from_env()
        self.pool = os.environ.get("FLAGSHIP_SERVICE_POOL") or "triage_pool"
        self.triage: dict[str, Triage] = {}
        self.opening: dict[str, asyncio.Lock] = {}

    async def for_client(self, client_id: str) -> Triage:
        if client_id in self.triage:
            return self.triage[client_id]
        async with self.opening.setdefault(client_id, asyncio.Lock()):  # one session even when first requests race
            if client_id not in self.triage:
                session = await asyncio.to_thread(self.client.session, self.pool, rehydrate=True)
                module = await asyncio.to_thread(session.predict, TRIAGE)
                self.triage[client_id] = Triage(session, module)
        return self.triage[client_id]

    async def close_client(self, client_id: str) -> bool:
        triage = self.triage.pop(client_id, None)
        self.opening.pop(client_id, None)
        if triage is not None:
            await asyncio.to_thread(triage.session.close)
        return triage is not None

    def close(self) -> None:
        for triage in self.triage.values():
            triage.session.close()
        self.client.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.service = Service()
    yield
    app.state.service.close()


app = FastAPI(title="flagship triage service", lifespan=lifespan)


@app.post("/clients/{client_id}/tickets")
async def classify(client_id: str, body: Ticket) -> dict[str, object]:
    service: Service = app.state.service
    triage = await service.for_client(client_id)
    try:
        pred = await triage.module.acall(ticket=body.ticket)
    except InvalidArgument as exc:
        raise HTTPException(422, str(exc)) from None
    except SessionWorkerUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    except FlagshipError as exc:
        raise HTTPException(502, f"{type(exc).__name__}: {exc}") from None
    return {"client": client_id, "session": triage.session.id, "worker": triage.session.worker,
            "category": pred.category, "urgency": pred.urgency, "action": pred.action}


@app.get("/clients/{client_id}/tickets/stream", response_class=EventSourceResponse)
async def classify_streamed(
    client_id: str, ticket: Annotated[str, Query(min_length=1, max_length=20_000)]
) -> AsyncIterable[ServerSentEvent]:
    """The triage answer as Server-Sent Events while the LM writes it; a disconnect cancels the call."""
    service: Service = app.state.service
    try:
        triage = await service.for_client(client_id)
        async with triage.module.astream(ticket=ticket) as stream:  # leaving it (a disconnect too) cancels
            async for item in stream:
                if isinstance(item, StreamChunk):
                    yield ServerSentEvent(event="chunk", data={"field": item.field, "text": item.text,
                                                               "call_id": item.call_id})
                elif isinstance(item, StreamStatus):
                    yield ServerSentEvent(event="status", data={"message": item.message, "call_id": item.call_id})
                else:  # the Prediction, last
                    yield ServerSentEvent(event="done", data={"prediction": dict(item), "call_id": stream.call_id,
                                                              "session": triage.session.id,
                                                              "worker": triage.session.worker})
    except FlagshipError as exc:
        yield ServerSentEvent(event="error", data={"type": type(exc).__name__, "message": str(exc)})


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE.read_text()


@app.delete("/clients/{client_id}")
async def close_client(client_id: str) -> dict[str, bool]:
    return {"closed": await app.state.service.close_client(client_id)}
