"""A TCP proxy in front of the test server, optionally terminating TLS (the bundled Valkey has no TLS).

Pure Python (asyncio + ssl) on its own thread; the certificate is a self-signed
one for 127.0.0.1 made with the ``openssl`` command line.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest


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
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # failed handshakes are expected
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def close(self) -> None:
        """Stop listening and cut every connection (the broker is gone, as far as clients can tell)."""

        async def shut() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
