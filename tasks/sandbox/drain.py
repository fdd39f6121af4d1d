"""Drain a child's output pipe continuously and keep only its tail.

A pipe holds ~64 KB; a child that writes more than that to a pipe nobody
reads blocks in ``write``. Deno writes synchronously from its event loop, so
sandbox code that printed 100 KB to stderr froze the whole sandbox until the
execute limit killed it. A daemon thread per pipe reads it to EOF instead,
keeping the last ``limit_bytes`` for crash reports.
"""

from __future__ import annotations

import os
import threading
from typing import IO, Any

__all__ = ["PipeTail", "tail_bytes"]

#: How much of a sandbox's stderr is kept (the end of it).
tail_bytes = 64 * 1024
_CHUNK_BYTES = 64 * 1024


class PipeTail:
    """Reads ``stream`` on a daemon thread until EOF, then closes it; keeps the last ``limit_bytes``.

    The thread owns the stream: nobody else may read or close it (closing a
    file descriptor another thread blocks on could hand the number to a new
    file). It ends when every writer has exited, i.e. when the child is dead.
    """

    def __init__(self, stream: IO[Any], limit_bytes: int = tail_bytes, *, name: str = "sandbox-stderr") -> None:
        self.limit_bytes = limit_bytes
        self._stream = stream
        self._fd = stream.fileno()
        self._lock = threading.Lock()
        self._tail = bytearray()
        self._total = 0
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    @property
    def total_bytes(self) -> int:
        """Bytes read so far, kept or not."""
        with self._lock:
            return self._total

    def text(self) -> str:
        """The kept tail, decoded (a cut multi-byte character becomes U+FFFD)."""
        with self._lock:
            kept = bytes(self._tail[-self.limit_bytes:])
        return kept.decode("utf-8", errors="replace")

    def wait(self, timeout_s: float) -> bool:
        """Wait until EOF (the child exited); True when the pipe is fully read."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _drain(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._fd, _CHUNK_BYTES)
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    self._total += len(chunk)
                    self._tail += chunk
                    if len(self._tail) > 2 * self.limit_bytes:  # trim in batches: amortized O(1) per byte
                        del self._tail[: -self.limit_bytes]
        finally:
            try:
                self._stream.close()
            except OSError:
                pass
