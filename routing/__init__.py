"""Pools, sessions and affinity routing for stateful workers on Celery + Redis.

Shared contracts (names, errors, settings, the pool table, the registry, session
records, recipes, heartbeat and reaper) and the producer side (``routing.producer``).
Imports neither ``dspy`` nor ``tasks``: producers need only this package.
"""

from __future__ import annotations

from routing.pools import Affinity, Pool, PoolTable
from routing.producer.client import Client
from routing.producer.future import CallFuture, agather, gather
from routing.producer.prediction import Prediction
from routing.producer.session import Session
from routing.settings import Settings

__all__ = [
    "Affinity", "CallFuture", "Client", "Pool", "PoolTable", "Prediction", "Session", "Settings", "agather", "gather",
]
