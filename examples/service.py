"""A small async service in front of the triage pool (FastAPI; ``pip install -e '.[service]'``).

Each client of the service gets its own triage session (kept while it keeps
calling, closed with ``DELETE /clients/{client_id}``); tickets are classified on
the worker that holds that session's ``Predict``. Waiting for a worker costs the
event loop nothing: ``await module.acall(...)`` holds no thread per request.

    REDIS_URL=redis://localhost:6379/0 uvicorn examples.service:app --port 8000
    curl -X POST localhost:8000/clients/acme/tickets -H 'content-type: application/json' \\
         -d '{"ticket": "I was charged twice on my last invoice"}'
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from routing import Client, Session
from routing.errors import FlagshipError, InvalidArgument, SessionWorkerUnavailable
from routing.producer.handles import ModuleRef

TRIAGE = "ticket -> category, urgency, action"


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
        self.triage: dict[str, Triage] = {}
        self.opening: dict[str, asyncio.Lock] = {}

    async def for_client(self, client_id: str) -> Triage:
        if client_id in self.triage:
            return self.triage[client_id]
        async with self.opening.setdefault(client_id, asyncio.Lock()):  # one session even when first requests race
            if client_id not in self.triage:
                session = await asyncio.to_thread(self.client.session, "triage_pool", rehydrate=True)
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


@app.delete("/clients/{client_id}")
async def close_client(client_id: str) -> dict[str, bool]:
    return {"closed": await app.state.service.close_client(client_id)}
