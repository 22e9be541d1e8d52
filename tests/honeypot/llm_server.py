"""A small OpenAI-compatible chat-completions server on 127.0.0.1 with canned answers.

It speaks the real wire protocol (``POST /v1/chat/completions``, a JSON body, a
``chat.completion`` object or an OpenAI-style error back), so mailgate's code talks to it
with the real ``openai`` client. Every request is recorded (path, headers, body) for the
tests to check; the answers are given in order, the last one repeated.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    """One canned answer: ``content`` as the assistant's message, or an HTTP ``status``
    with an error, after waiting ``delay`` seconds."""

    content: str | None = None
    status: int = 200
    delay: float = 0.0
    #: A body sent as is instead of a completion (a broken server).
    raw_body: bytes | None = None
    #: Seconds between the body's bytes: a server that trickles its answer.
    trickle: float = 0.0


def good(identity: dict[str, Any]) -> Answer:
    return Answer(content=json.dumps(identity))


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeLLM:
    answers: list[Answer]
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def next_answer(self) -> Answer:
        index = min(len(self.requests) - 1, len(self.answers) - 1)
        return self.answers[index]


def _handler(llm: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"unparsable": raw.decode(errors="replace")}
            llm.requests.append(
                Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found", "type": "invalid_request"}})
                return
            answer = llm.next_answer()
            if answer.delay:
                llm._stop.wait(answer.delay)  # ends early when the server stops
            if answer.raw_body is not None:
                self._send_bytes(answer.status, answer.raw_body)
            elif answer.trickle:
                self._trickle(answer)
            elif answer.status != 200:
                self._send(
                    answer.status,
                    {
                        "error": {
                            "message": f"canned error {answer.status}",
                            "type": "invalid_request_error",
                            "code": None,
                        }
                    },
                )
            else:
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(llm.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", ""),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer.content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                    },
                )

        def _trickle(self, answer: Answer) -> None:
            data = json.dumps({"choices": [{"message": {"content": answer.content}}]}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.flush()
                for index in range(len(data)):
                    if llm._stop.wait(answer.trickle):
                        return
                    self.wfile.write(data[index : index + 1])
                    self.wfile.flush()
            except OSError:
                pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            self._send_bytes(status, json.dumps(payload).encode())

        def _send_bytes(self, status: int, data: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (a timeout test)

    return Handler


@contextmanager
def fake_llm(*answers: Answer) -> Iterator[FakeLLM]:
    """The server on a free port of 127.0.0.1; ``llm.url`` is its API base URL."""
    llm = FakeLLM(list(answers) or [Answer(content="{}")])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(llm))
    server.daemon_threads = True
    llm.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield llm
    finally:
        llm._stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def refusing_port() -> Iterator[str]:
    """An API URL whose port refuses connections (bound, not listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()
