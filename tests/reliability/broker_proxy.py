"""A TCP proxy in front of the test server, optionally terminating TLS (the bundled Valkey has no TLS).

Pure Python (asyncio + ssl) on its own thread; the certificate is a self-signed
one for 127.0.0.1 made with the ``openssl`` command line.

Faults, for tests (each takes effect before the call returns):

- ``drop()`` closes every current client connection once (bytes a black hole holds on them are lost); new
  ones are accepted as before.
- ``black_hole()`` / ``resume()``: no byte moves in either direction, nothing is closed (a network
  failure without a TCP reset: the client's writes succeed, its reads never return); then bytes flow again,
  held ones first.
- ``swallow_reply(b"LPUSH", count=1)``: the next ``count`` times a client sends that command, the server gets
  it and applies it, its reply is discarded and that client's connection closed (the client sees a
  connection error after the write happened).

The proxy follows the RESP framing (RESP2 and RESP3) of both directions, so it knows which reply answers
which command; it forwards only whole messages.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """``(cert, key)`` for ``127.0.0.1``, valid for a day; the cert is its own CA."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command line is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def resp_end(buffer: bytes, start: int) -> int | None:
    """End of the RESP message starting at ``start``, or ``None`` while it is incomplete."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, after = buffer[start:start + 1], line_end + 2
    if kind not in b"$=!*~>%|" or not kind:  # simple string, error, integer, null, double, bool, big number; inline
        return after
    size = int(buffer[start + 1:line_end])
    if size < 0:
        return after
    if kind in b"$=!":  # bulk string, verbatim string, bulk error
        end = after + size + 2
        return end if len(buffer) >= end else None
    for _ in range(size * 2 if kind in b"%|" else size):  # map and attribute: key and value per entry
        nested = resp_end(buffer, after)
        if nested is None:
            return None
        after = nested
    return after


def command_name(message: bytes) -> bytes:
    """The upper-cased command name of a client's RESP array (or inline command)."""
    if message.startswith(b"*"):
        length_at = message.find(b"\r\n") + 3  # past "\r\n$"
        name_at = message.find(b"\r\n", length_at) + 2
        return message[name_at:name_at + int(message[length_at:name_at - 2])].upper()
    return message.split(maxsplit=1)[0].upper() if message.strip() else b""


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the server."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    #: Commands sent and replies received so far (pushes are not replies).
    commands: int = 0
    replies: int = 0
    #: The number of the reply to discard (then the link is cut), once a swallowed command went up.
    swallow_at: int | None = None
    closed: bool = False

    def cut(self) -> None:
        self.closed = True
        self.client.close()
        self.server.close()


class BrokerProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; with ``tls=(cert, key)``, speaks TLS to clients."""

    def __init__(self, target_port: int, tls: tuple[Path, Path] | None = None) -> None:
        self.target_port = target_port
        self.context: ssl.SSLContext | None = None
        if tls:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(str(tls[0]), str(tls[1]))
        #: Client connections that got through (TLS handshake done, when TLS).
        self.connections = 0
        #: Replies discarded by ``swallow_reply`` so far.
        self.swallowed = 0
        self._links: set[_Link] = set()
        self._holding_new = False  # a black hole that takes new connections too
        self._swallow: dict[bytes, int] = {}
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # failed handshakes are expected
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _in_loop(self, action: Callable[[], T]) -> T:
        async def run() -> T:
            return action()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def drop(self) -> None:
        """Close every current client connection once (and its server side); new connections are accepted."""

        def cut_all() -> None:
            for link in list(self._links):
                link.cut()
                link.flowing.set()  # held bytes are dropped, not delivered

        self._in_loop(cut_all)

    def black_hole(self, *, new_connections: bool = True) -> None:
        """Stop moving bytes on every connection, closing nothing; with ``new_connections``, on later ones too."""

        def hole() -> None:
            self._holding_new = new_connections
            for link in self._links:
                link.flowing.clear()

        self._in_loop(hole)

    def resume(self) -> None:
        """Undo ``black_hole``: held bytes are delivered, then everything flows again."""

        def flow() -> None:
            self._holding_new = False
            for link in self._links:
                link.flowing.set()

        self._in_loop(flow)

    def swallow_reply(self, command: bytes = b"LPUSH", count: int = 1) -> None:
        """The next ``count`` times a client sends ``command``, apply it, discard its reply, close that client."""
        name = command.upper()
        self._in_loop(lambda: self._swallow.__setitem__(name, self._swallow.get(name, 0) + count))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        if not self._holding_new:
            link.flowing.set()
        self._links.add(link)
        try:
            await asyncio.gather(self._requests(link, reader), self._replies(link, up_reader))
        finally:
            self._links.discard(link)

    async def _requests(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to server, whole commands at a time; stops after a command whose reply is to be swallowed."""
        buffer = b""
        try:
            while data := await reader.read(65536):
                await link.flowing.wait()
                if link.closed:
                    return
                buffer += data
                done = 0
                while (end := resp_end(buffer, done)) is not None:
                    name = command_name(buffer[done:end])
                    link.commands += 1
                    done = end
                    if self._swallow.get(name, 0) > 0:
                        self._swallow[name] -= 1
                        link.swallow_at = link.commands
                        link.server.write(buffer[:done])
                        await link.server.drain()
                        return  # nothing more goes up: the link is cut when the reply arrives
                link.server.write(buffer[:done])
                buffer = buffer[done:]
                await link.server.drain()
        except (OSError, ssl.SSLError, ValueError):
            pass
        if link.swallow_at is None:
            link.cut()

    async def _replies(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Server to client, whole replies at a time; the swallowed reply and what follows are discarded."""
        buffer = b""
        try:
            while data := await reader.read(65536):
                await link.flowing.wait()
                if link.closed:
                    return
                buffer += data
                done = 0
                while (end := resp_end(buffer, done)) is not None:
                    if buffer[done:done + 1] != b">":
                        link.replies += 1
                    if link.replies == link.swallow_at:
                        link.client.write(buffer[:done])
                        await link.client.drain()
                        self.swallowed += 1
                        return
                    done = end
                link.client.write(buffer[:done])
                buffer = buffer[done:]
                await link.client.drain()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            link.cut()

    def close(self) -> None:
        """Stop listening and cut every connection (the broker is gone, as far as clients can tell)."""

        async def shut() -> None:
            self._server.close()
            for link in list(self._links):
                link.flowing.set()
                link.cut()
            await asyncio.sleep(0)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
