"""Headless Chromium for the tests that look at a page: finding it, one-shot runs, PNG checks, and DevTools.

Debian's ``chromium`` is installed with apt-get when missing (:func:`chromium_binary`; skips when that
cannot be). :func:`run_chromium` is one headless run (``--dump-dom``, ``--screenshot``). :class:`DevTools`
drives a live page over the Chrome DevTools protocol on ``--remote-debugging-pipe`` (JSON messages ending
in NUL on file descriptors 3 and 4: no websocket client needed), to watch a page change in real time.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import debian_binary

#: Chromium's install from Debian, when a test has to do it.
chromium_install_timeout_s = 900.0

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_binary() -> str:
    """Debian's ``chromium``, installed with apt-get when missing (skips the test if that is not possible)."""
    return debian_binary("chromium", find_chromium, chromium_install_timeout_s)


def run_chromium(binary: str, *args: str, window: tuple[int, int] = (1400, 900),
                 timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """One headless run with a fresh profile (``args``: e.g. ``--dump-dom URL`` or ``--screenshot=PATH URL``)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}",
                               f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and number of distinct colours of an 8-bit RGB(A) PNG (no imaging library needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour_type in (2, 6), f"unexpected PNG format (depth {depth}, type {colour_type})"
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        filt, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 0xFF
            elif filt == 2:
                line[i] = (line[i] + b) & 0xFF
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 4 == 0:  # sampling every fourth row is plenty to tell a page from a blank
            colours.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, len(colours)


class DevTools:
    """One headless Chromium page driven over the DevTools protocol (``--remote-debugging-pipe``)."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc, self._out, self._in = proc, to_browser, from_browser
        self._buffer, self._last_id = b"", 0
        self.session = ""

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """One command's result (on the page once attached); a protocol error fails the test."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._last_id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    result: dict[str, Any] = reply.get("result", {})
                    return result
            assert time.monotonic() < deadline, f"Chromium did not answer {method} within {timeout_s} s"
            data = os.read(self._in, 1 << 16)
            assert data, f"Chromium closed its DevTools pipe (exit {self.proc.poll()})"
            self._buffer += data

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values)."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def navigate(self, url: str, timeout_s: float = 30.0) -> None:
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout_s
        while self.evaluate("document.readyState") != "complete" or self.evaluate("location.href") != url:
            assert time.monotonic() < deadline, f"{url} did not load within {timeout_s} s"
            time.sleep(0.02)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))


@contextmanager
def devtools(binary: str, window: tuple[int, int] = (1280, 800)) -> Iterator[DevTools]:
    """A headless Chromium with one blank page attached, closed afterwards."""
    browser_reads, we_write = os.pipe()
    we_read, browser_writes = os.pipe()

    def on_fds_3_and_4() -> None:  # in the child: Chromium's DevTools pipe ends (via high fds: no clobbering)
        reads, writes = fcntl.fcntl(browser_reads, fcntl.F_DUPFD, 10), fcntl.fcntl(browser_writes, fcntl.F_DUPFD, 10)
        os.dup2(reads, 3)
        os.dup2(writes, 4)

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}",
                                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                                pass_fds=(3, 4), preexec_fn=on_fds_3_and_4,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(browser_reads)
        os.close(browser_writes)
        tools = DevTools(proc, we_write, we_read)
        try:
            pages = [t for t in tools.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            assert pages, "Chromium opened no page"
            tools.session = tools.send("Target.attachToTarget", {"targetId": pages[0]["targetId"],
                                                                 "flatten": True})["sessionId"]
            tools.send("Emulation.setDeviceMetricsOverride", {"width": window[0], "height": window[1],
                                                              "deviceScaleFactor": 1, "mobile": False})
            yield tools
        finally:
            proc.kill()
            proc.wait(15)
            os.close(we_write)
            os.close(we_read)
