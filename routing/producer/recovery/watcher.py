"""What the producer's call watchers share: entries by task id, and one daemon thread for all of them.

The thread starts with the first entry and waits on the condition while there is nothing
to do; ``close()`` stops it. A subclass adds entries under ``_cond`` with :meth:`_watch`
and runs its loop in ``_run``, returning once ``_stop`` is set.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

Entry = TypeVar("Entry")


class CallWatcher(Generic[Entry]):
    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._cond = threading.Condition()
        self._watched: dict[str, Entry] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    def _watch(self, task_id: str, entry: Entry, reply: Future[Any]) -> None:
        """Under ``_cond``: watch ``entry`` until ``reply`` settles (or :meth:`forget`); the thread runs from now on."""
        self._watched[task_id] = entry
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._thread.start()
        reply.add_done_callback(lambda _: self.forget(task_id))

    def watched(self) -> int:
        """Calls still watched (settled ones are forgotten)."""
        with self._cond:
            return len(self._watched)

    def forget(self, task_id: str) -> None:
        """Stop watching the call (it settled, or nobody waits for it any more)."""
        with self._cond:
            self._watched.pop(task_id, None)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        raise NotImplementedError
