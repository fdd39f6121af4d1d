"""The ref store: DSPy objects kept in a worker's memory, keyed by session and ref id.

Producers hold JSON handles; objects never cross the wire. The store is bounded
(least-recently-used eviction past ``max_refs``) and remembers recently evicted
ids so using one is a clear ``RefEvicted`` rather than a puzzling ``RefNotFound``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from routing.errors import RefEvicted, RefNotFound, RefSessionMismatch

#: Default cap on refs held by one worker (across sessions).
default_max_refs = 10_000
#: How many evicted ids are remembered for a clear error.
evicted_memory = 10_000


@dataclass
class RefEntry:
    ref_id: str
    session_id: str
    kind: str
    obj: Any
    recipe: dict[str, Any]
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)


class RefStore:
    def __init__(self, node: str, max_refs: int = default_max_refs) -> None:
        self.node = node
        self.max_refs = max_refs
        self._lock = threading.Lock()
        self._refs: OrderedDict[str, RefEntry] = OrderedDict()
        self._evicted: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: Session id -> ref id of the session's default LM.
        self.default_lm: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._refs)

    @staticmethod
    def new_id(kind: str) -> str:
        return f"{kind}-{uuid.uuid4().hex[:12]}"

    def put(self, session_id: str, kind: str, obj: Any, recipe: dict[str, Any], ref_id: str | None = None) -> RefEntry:
        entry = RefEntry(ref_id or self.new_id(kind), session_id, kind, obj, recipe)
        with self._lock:
            existing = self._refs.get(entry.ref_id)
            if existing is not None and existing.session_id != session_id:
                raise RefSessionMismatch(entry.ref_id, existing.session_id, session_id)
            self._refs[entry.ref_id] = entry
            self._refs.move_to_end(entry.ref_id)
            self._evicted.pop(entry.ref_id, None)
            while len(self._refs) > self.max_refs:
                _, old = self._refs.popitem(last=False)
                self._forget_default(old)
                self._evicted[old.ref_id] = (old.session_id, old.kind)
                while len(self._evicted) > evicted_memory:
                    self._evicted.popitem(last=False)
        return entry

    def get(self, session_id: str, ref_id: str, kind: str | None = None) -> RefEntry:
        with self._lock:
            entry = self._refs.get(ref_id)
            if entry is None:
                evicted = self._evicted.get(ref_id)
                if evicted and evicted[0] == session_id:
                    raise RefEvicted(ref_id, session_id, self.max_refs)
                raise RefNotFound(ref_id, session_id, self.node)
            if entry.session_id != session_id:
                raise RefSessionMismatch(ref_id, entry.session_id, session_id)
            if kind is not None and not entry.kind.startswith(kind):
                raise RefNotFound(ref_id, session_id, self.node)
            entry.last_used = time.time()
            self._refs.move_to_end(ref_id)
            return entry

    def release(self, session_id: str, ref_id: str) -> bool:
        self.get(session_id, ref_id)  # typed errors for a foreign or unknown ref
        with self._lock:
            entry = self._refs.pop(ref_id, None)
            if entry is not None:
                self._forget_default(entry)
            return entry is not None

    def release_session(self, session_id: str) -> int:
        with self._lock:
            ids = [r for r, e in self._refs.items() if e.session_id == session_id]
            for ref_id in ids:
                del self._refs[ref_id]
            self.default_lm.pop(session_id, None)
            return len(ids)

    def session_refs(self, session_id: str, kind: str | None = None) -> list[RefEntry]:
        with self._lock:
            return [e for e in self._refs.values()
                    if e.session_id == session_id and (kind is None or e.kind == kind)]

    def sessions(self) -> set[str]:
        with self._lock:
            return {e.session_id for e in self._refs.values()}

    def _forget_default(self, entry: RefEntry) -> None:
        if self.default_lm.get(entry.session_id) == entry.ref_id:
            del self.default_lm[entry.session_id]
