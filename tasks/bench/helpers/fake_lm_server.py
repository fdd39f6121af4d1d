"""A small OpenAI-protocol server: real HTTP, a fixed answer delay, scripted failures, recorded requests.

Benchmarks (``flagship bench lm``) and tests drive the real ``dspy.LM`` HTTP
client (retries, error mapping, usage accounting) against it without any model
API. Replies are produced by the offline LM's rules, so they parse as DSPy
ChatAdapter/JSONAdapter output (e.g. ``ticket -> category``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tasks.lm.offline import reply_for

__all__ = ["FakeOpenAI", "RecordedRequest", "Failure"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_api_key", 403: "permission_denied",
                404: "model_not_found", 429: "rate_limit_exceeded", 500: "server_error", 503: "overloaded"}


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    #: ``time.monotonic()`` when it arrived.
    at: float = 0.0
    #: The status it was answered with.
    status: int = 200
    #: ``time.monotonic()`` when a streamed answer's last chunk was sent (0: not streamed, or not yet).
    finished_at: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages") or []


@dataclass
class Failure:
    """One scripted answer that is not a normal completion."""

    status: int = 200
    delay_s: float = 0.0
    message: str = "scripted failure"
    #: Extra response headers (e.g. ``Retry-After``).
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeOpenAI:
    """``POST /v1/chat/completions`` on a free loopback port; use as a context manager."""

    reply: Callable[[list[dict[str, Any]]], str] = reply_for
    model: str = "fake-model"
    #: Seconds every successful answer takes (a model's latency); scripted delays add to it.
    delay_s: float = 0.0
    #: Keep every request in ``requests`` (off for long benchmark runs).
    record: bool = True
    #: A ``"stream": true`` request gets its answer as Server-Sent Events in this many pieces (word-aligned),
    #: ``chunk_delay_s`` apart; the first one leaves after ``delay_s``.
    stream_pieces: int = 8
    chunk_delay_s: float = 0.0
    requests: list[RecordedRequest] = field(default_factory=list)
    served: int = 0
    #: Tokens the server reported in its answers' ``usage``, added up.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _script: deque[Failure] = field(default_factory=deque)
    _always: Failure | None = None
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- scripting ---------------------------------------------------------
    def fail(self, status: int, times: int = 1, message: str = "scripted failure",
             retry_after: str | None = None) -> FakeOpenAI:
        """The next ``times`` requests get ``status`` (with a ``Retry-After`` header if given); later ones succeed."""
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        self._script.extend(Failure(status, message=message, headers=headers) for _ in range(times))
        return self

    def always(self, status: int, message: str = "scripted failure") -> FakeOpenAI:
        """Every request gets ``status`` (e.g. 401 for a revoked key)."""
        self._always = Failure(status, message=message)
        return self

    def slow(self, delay_s: float, times: int = 1) -> FakeOpenAI:
        """The next ``times`` requests succeed only after ``delay_s`` seconds."""
        self._script.extend(Failure(200, delay_s=delay_s) for _ in range(times))
        return self

    # -- lifecycle ---------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        # Many clients connect at once (64 benchmark threads): the default listen backlog of 5 drops SYNs.
        server_cls = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 1024})
        self._server = server_cls(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ---------------------------------------------------------
    def _next(self, request: RecordedRequest) -> Failure:
        with self._lock:
            self.served += 1
            if self.record:
                self.requests.append(request)
            outcome = self._always or (self._script.popleft() if self._script else Failure())
            request.status = outcome.status
            return outcome

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        text = self.reply(messages)
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1
        completion_tokens = len(text) // 4 + 1
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
        return {
            "id": f"chatcmpl-fake-{self.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"
    #: Headers and body go out as two writes: without TCP_NODELAY the body waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def _send(self, status: int, payload: dict[str, Any], not_before: float = 0.0,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        wait = not_before - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); nothing to answer

    def do_POST(self) -> None:
        arrived = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_unparsed": raw.decode(errors="replace")}
        request = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body, arrived)
        outcome = self.fake._next(request)
        # The answer is ready first and leaves ``delay_s`` after the request arrived, as a model's latency
        # would: the server's own work does not add to the delay.
        answer_at = arrived + outcome.delay_s + (self.fake.delay_s if outcome.status == 200 else 0.0)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": None}},
                       answer_at)
        elif outcome.status != 200:
            error_type = _ERROR_TYPES.get(outcome.status, "error")
            self._send(outcome.status, {"error": {"message": outcome.message, "type": error_type,
                                                  "code": error_type, "param": None}}, answer_at,
                       outcome.headers)
        elif body.get("stream"):
            self._stream(self.fake.completion(body), request, answer_at)
        else:
            self._send(200, self.fake.completion(body), answer_at)

    def _stream(self, completion: dict[str, Any], request: RecordedRequest, not_before: float) -> None:
        """The completion as OpenAI's ``chat.completion.chunk`` events (``data: ...``), then ``data: [DONE]``."""
        text = completion["choices"][0]["message"]["content"]
        words = re.findall(r"\S+\s*|\s+", text) or [text]
        step = max(1, -(-len(words) // max(1, self.fake.stream_pieces)))
        pieces = ["".join(words[i:i + step]) for i in range(0, len(words), step)]
        base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                "model": completion["model"]}
        deltas = [{"index": 0, "delta": {"role": "assistant", "content": piece} if i == 0 else {"content": piece},
                   "finish_reason": None} for i, piece in enumerate(pieces)]
        events = [{**base, "choices": [delta]} for delta in deltas]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": completion["usage"]})
        if (wait := not_before - time.monotonic()) > 0:
            time.sleep(wait)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, event in enumerate(events):
                if i and self.fake.chunk_delay_s and i < len(pieces):
                    time.sleep(self.fake.chunk_delay_s)
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            request.finished_at = time.monotonic()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.bench.helpers.fake_lm_server --delay-s 0.2``: print the base URL, serve until stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tasks.bench.helpers.fake_lm_server")
    parser.add_argument("--delay-s", type=float, default=0.2, help="seconds each answer takes")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="seconds between a streamed answer's pieces")
    args = parser.parse_args(argv)
    with FakeOpenAI(delay_s=args.delay_s, chunk_delay_s=args.chunk_delay_s, record=False) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()  # the parent closes our stdin (or exits) to stop us
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
