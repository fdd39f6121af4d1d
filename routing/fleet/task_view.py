"""How a call looks in Celery's task events: Flower, ``celery events``, ``flagship metrics``.

Every call is one Celery task, ``flagship.call``. The producer sends it under a
*shadow* name per operation, so monitoring can tell, filter and count calls by
what they do: ``flagship.ping``, ``flagship.lm``, ``flagship.predict`` (a Predict
is built), ``flagship.predict.call`` (it runs), ``flagship.rlm.call``,
``flagship.predict.map`` (a batch of runs) ... The worker still runs the real
task (Celery looks it up by its real name), so only what is shown changes.

Its args repr is short and names the pool, ref and session first (Flower's
Tasks tab cuts the column), then the arguments, every secret one
(``routing.fleet.recipes.SECRET_ARGUMENTS``, at any depth) masked, e.g.
``pool=triage_pool ref=predict-3e1d… session=1f0c… inputs={'ticket': 'Checkout…'}``.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from itertools import islice
from typing import Any

from routing import names
from routing.fleet import recipes

#: Prefix of every shadow name (and of the real task's name).
TASK_PREFIX = "flagship."
#: An operation or ref kind that may appear in a task name (and a metrics label).
_WORD = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: What an args repr shows at most.
ARGSREPR_MAX_CHARS = 400


def _word(value: Any) -> str | None:
    return value if isinstance(value, str) and _WORD.fullmatch(value) else None


def ref_kind(ref: Any) -> str | None:
    """The kind a ref id names (``predict-3e1d…`` → ``predict``), or None."""
    return _word(ref.rpartition("-")[0]) if isinstance(ref, str) else None


def _first_item(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    items = kwargs.get("items")
    first = items[0] if isinstance(items, list) and items else None
    return first if isinstance(first, Mapping) else {}


def operation_name(op: str, kwargs: Mapping[str, Any]) -> str:
    """What a call does, as shown: the operation, or ``<kind>.call`` / ``<kind>.map`` for module runs."""
    if _word(op) is None:
        return "invalid"
    if op == "call":
        return f"{ref_kind(kwargs.get('ref')) or 'module'}.call"
    if op == "map":
        inner = _word(kwargs.get("op"))
        if inner == "call":
            return f"{ref_kind(_first_item(kwargs).get('ref')) or 'module'}.map"
        return f"{inner}.map" if inner else "map"
    return op


def task_name(op: str, kwargs: Mapping[str, Any]) -> str:
    """The shadow task name a call is sent under (``flagship.predict.call``)."""
    return TASK_PREFIX + operation_name(op, kwargs)


def operation_of(name: str | None) -> str | None:
    """The operation a task name shows (``flagship.rlm.call`` → ``rlm.call``); None: not a flagship call."""
    if not name or not name.startswith(TASK_PREFIX) or name == names.NOOP_TASK:
        return None
    return name[len(TASK_PREFIX):] or None


class _Shown(reprlib.Repr):
    """``reprlib`` with secrets masked in every dict it shows (bounded: it walks only what it prints)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple = 3, 6, 4, 4
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        return super().repr_dict(recipes.masked(dict(islice(x.items(), self.maxdict + 1))), level)


_shown = _Shown()


def call_argsrepr(args: list[Any]) -> str:
    """``[session_id, op, kwargs, route]`` as shown: pool, ref, session, then the arguments, secrets masked."""
    session_id, _op, kwargs, route = (list(args) + [None] * 4)[:4]
    kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    route = route if isinstance(route, Mapping) else {}
    parts = [f"pool={route.get('pool')}"]
    ref = kwargs.get("ref") or kwargs.get("ref_id") or _first_item(kwargs).get("ref")
    if isinstance(ref, str):
        parts.append(f"ref={_shown.repr(ref)[1:-1]}")
    parts.append(f"session={session_id}")
    for key, value in islice(kwargs.items(), _shown.maxdict + 1):
        if key in ("ref", "ref_id"):
            continue
        parts.append(f"{key}=***" if key in recipes.SECRET_ARGUMENTS else f"{key}={_shown.repr(value)}")
    text = " ".join(parts)
    return text if len(text) <= ARGSREPR_MAX_CHARS else text[: ARGSREPR_MAX_CHARS - 1] + "…"
