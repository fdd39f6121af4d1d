"""Pools, sessions and affinity routing for stateful workers on Celery + Redis.

Rooms, each importing only the ones below it (``.importlinter`` checks it):

- ``routing.producer``: the client, sessions, handles, futures, the router (the producer side);
- ``routing.fleet``: who is alive and what they hold (registry, heartbeat, reaper, session records, recipes);
- ``routing.broker``: Redis and Celery/kombu plumbing (connections, transport, result store, scripts);
  the only room that touches kombu's or Celery's private names;
- the contracts at this level: ``names``, ``errors``, ``settings``, ``pools``, ``arguments``, ``validate``.

Imports neither ``dspy`` nor ``tasks``: producers need only this package.
"""

from __future__ import annotations

from routing.pools import Affinity, Pool, PoolTable
from routing.producer.client import Client
from routing.producer.future import CallFuture, agather, gather
from routing.producer.prediction import History, Prediction
from routing.producer.session import Session
from routing.producer.streams import StreamChunk, StreamStatus
from routing.settings import Settings

__all__ = [
    "Affinity", "CallFuture", "Client", "History", "Pool", "PoolTable", "Prediction", "Session", "Settings",
    "StreamChunk", "StreamStatus", "agather", "gather",
]
