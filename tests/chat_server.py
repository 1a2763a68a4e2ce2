"""A real chat-completions server on 127.0.0.1 whose replies each test scripts (for judge tests)."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Reply:
    """One scripted server answer: a chat completion with `content`, or a raw `body` with any status."""

    content: str = "Plays the pirate throughout.\nSCORE: 3"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes | None = None
    hang: bool = False  # never answer until the test calls FakeServer.release() (or the fixture ends)

    def payload(self) -> bytes:
        if self.body is not None:
            return self.body
        if self.status != 200:
            return json.dumps({"error": {"message": f"scripted {self.status}"}}).encode()
        message = {"role": "assistant", "content": self.content}
        return json.dumps({"choices": [{"index": 0, "message": message}]}).encode()


class FakeServer(ThreadingHTTPServer):
    """Records every request, tracks the most requests seen in flight, and answers with `respond(body)`.

    Deterministic synchronisation for concurrency tests: after `gather(n)` requests are answered
    in waves, each held until n are in flight together. A client that keeps at most n in flight
    then reaches exactly max_in_flight == n whatever the scheduling: the wave's n requests are all
    counted before any is let go, and all leave the count before any is answered, so the client's
    next request cannot overlap them (`gather` says how a client that sends more is caught). A
    wave that never fills breaks the barrier (`broken` is set and the held requests get HTTP 400
    "barrier broken"). A Reply(hang=True) is held until `release()`.
    """

    daemon_threads = False  # server_close() joins the handler threads

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.respond: Callable[[dict[str, Any]], Reply] = lambda body: Reply()
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.barrier: threading.Barrier | None = None
        self.broken = False
        self.released = threading.Event()

    def gather(self, n: int, settle_s: float = 0.1, timeout_s: float = 30.0) -> None:
        """From now on hold each request until n are in flight together, then answer that wave.

        The first wave is held settle_s longer once full: a client that sends more than n at once is
        then caught with its extra request counted in flight. (This only helps catch a faulty client;
        a correct one passes whatever the timing.)
        """
        trips = iter(range(1 << 30))

        def first_settles() -> None:
            if next(trips) == 0:
                time.sleep(settle_s)

        self.barrier = threading.Barrier(n, action=first_settles, timeout=timeout_s)

    def release(self) -> None:
        """Let every Reply(hang=True) request go (they are answered; the client may have given up)."""
        self.released.set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def play(self, *replies: Reply) -> None:
        """Answer with these replies in turn, then keep repeating the last one."""
        queue = deque(replies)
        self.respond = lambda body: queue.popleft() if len(queue) > 1 else queue[0]

    def answer(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Reply:
        with self.lock:
            self.requests.append((path, headers, body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            reply, barrier = self.respond(body), self.barrier
        try:
            if barrier is not None:
                barrier.wait()  # the whole wave is counted in flight
            if reply.hang:
                self.released.wait()
            time.sleep(reply.delay_s)
        except threading.BrokenBarrierError:
            self.broken = True
            reply = Reply(status=400, body=b'{"error": {"message": "barrier broken: the wave never filled"}}')
        with self.lock:
            self.in_flight -= 1  # before the answer is sent, so the client cannot start its next request first
        if barrier is not None and not self.broken:
            try:
                barrier.wait()  # the whole wave has left the count before any of it is answered
            except threading.BrokenBarrierError:
                self.broken = True
        return reply


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = self.server.answer(self.path, dict(self.headers), body)
        payload = reply.payload()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:  # the client gave up (a timeout test)
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    thread = threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield fake
    finally:
        fake.release()
        if fake.barrier is not None:
            fake.barrier.abort()
        fake.shutdown()
        fake.server_close()
        thread.join()
