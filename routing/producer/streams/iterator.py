"""A streamed call as an iterator (``ModuleRef.stream``) or an async iterator (``ModuleRef.astream``).

Items come in the worker's order: ``StreamChunk``/``StreamStatus`` until the worker's end
entry, then the call's ``Prediction`` (its future's result, as ``ModuleRef.__call__``
returns it). A call that fails (its worker died, the module raised) raises its typed
error after the items already delivered. A call that succeeded without an end entry
reaching us (a safety net: reruns write to the first run's stream) gets its stream read
once more directly, then its ``Prediction``. ``close()`` (also on leaving a ``with``
block, or a dropped iterator) cancels the call: it is revoked, a running one stops
streaming at its next chunk, and its stream is no longer read.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from routing.producer.streams.items import END, StreamChunk, StreamStatus
from routing.producer.streams.reader import StreamReader

__all__ = ["AsyncCallStream", "CallStream"]

#: After the call's result, how long its end entry may still take to be read before the stream is read directly.
end_grace_s = 2.0
_DONE, _CAUGHT_UP = object(), object()


def _to_weak(put: weakref.WeakMethod[Callable[[Any], None]], item: Any) -> None:
    if (method := put()) is not None:
        method(item)


def _done_to_weak(put: weakref.WeakMethod[Callable[[Any], None]], _: Future[Any]) -> None:
    _to_weak(put, _DONE)


def _let_go(reader: StreamReader, key: str, future: Future[Any]) -> None:
    """An iterator collected: stop reading its stream; cancel its call unless it settled."""
    reader.close(key)
    future.cancel()


class _Stream:
    """What both iterators share: the call, its stream, and what an item means."""

    def __init__(self, future: Future[Any], reader: StreamReader, key: str, call_id: str) -> None:
        self.future, self.reader, self.key, self.call_id = future, reader, key, call_id
        self.finished = False
        #: When the call settled without its end entry read yet (the grace period runs from then).
        self._settled_at: float | None = None
        # The reader and the future hold this iterator weakly: one dropped unfinished (a ``break`` without
        # ``with``) is collected, and that cancels its call and stops reading its stream.
        reader.open(key, call_id, functools.partial(_to_weak, weakref.WeakMethod(self._put)))
        future.add_done_callback(functools.partial(_done_to_weak, weakref.WeakMethod(self._put)))
        weakref.finalize(self, _let_go, reader, key, future)

    def _put(self, item: Any) -> None:
        raise NotImplementedError

    def _wait_s(self) -> float | None:
        """How long to wait for the next item (None: until one comes)."""
        return None if self._settled_at is None else max(0.0, self._settled_at + end_grace_s - time.monotonic())

    def _item(self, item: Any) -> StreamChunk | StreamStatus | None:
        """An item to yield, None to read on; at the end ``finished`` is set (the caller gives the result)."""
        if isinstance(item, (StreamChunk, StreamStatus)):
            return item
        if item is END or item is _CAUGHT_UP:
            self._end()
        elif item is _DONE:
            if self.future.cancelled() or self.future.exception() is not None:
                self._end()
            else:
                self._settled_at = time.monotonic()
        return None

    def _timed_out(self) -> None:
        """No end entry within the grace period after the result: read the stream directly, then finish."""
        self._settled_at = None
        self.reader.catch_up(self.key)
        self._put(_CAUGHT_UP)

    def _end(self) -> None:
        self.finished = True
        self.reader.close(self.key)

    def _cancel(self) -> None:
        if not self.finished:
            self._end()
            self.future.cancel()


class CallStream(_Stream):
    """``for item in module.stream(...)``: chunks and statuses, then the ``Prediction``; a context manager."""

    def __init__(self, future: Future[Any], reader: StreamReader, key: str, call_id: str) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        super().__init__(future, reader, key, call_id)

    def _put(self, item: Any) -> None:
        self._items.put(item)

    def __iter__(self) -> CallStream:
        return self

    def __next__(self) -> Any:
        while not self.finished:
            try:
                item = self._items.get(timeout=self._wait_s())
            except queue.Empty:
                self._timed_out()
                continue
            if (out := self._item(item)) is not None:
                return out
            if self.finished:
                if self.future.cancelled():
                    break
                return self.future.result()  # the Prediction, or the call's typed error
        raise StopIteration

    def close(self) -> None:
        """Stop: cancel the call if it has not finished, stop reading its stream."""
        self._cancel()

    def __enter__(self) -> CallStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class AsyncCallStream(_Stream):
    """``async for item in module.astream(...)``: the same items on the event loop; ``aclose()`` cancels."""

    def __init__(self, future: Future[Any], reader: StreamReader, key: str, call_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        super().__init__(future, reader, key, call_id)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass

    def __aiter__(self) -> AsyncCallStream:
        return self

    async def __anext__(self) -> Any:
        while not self.finished:
            try:
                item = await asyncio.wait_for(self._items.get(), self._wait_s())
            except TimeoutError:
                await self._loop.run_in_executor(None, self._timed_out)
                continue
            if (out := self._item(item)) is not None:
                return out
            if self.finished:
                if self.future.cancelled():
                    break
                return await asyncio.wrap_future(self.future)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop: cancel the call if it has not finished, stop reading its stream."""
        self._cancel()

    async def __aenter__(self) -> AsyncCallStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cancel()

