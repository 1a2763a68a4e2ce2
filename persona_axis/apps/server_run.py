"""Running the server app: in a background thread (tests, benchmarks) or in the foreground until SIGTERM or
Ctrl-C, draining running requests first."""

from __future__ import annotations

import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from persona_axis.apps.server import PersonaServer
from persona_axis.apps.server_access import check_exposure
from persona_axis.apps.server_http import HttpOptions, build_app
from persona_axis.errors import PersonaAxisError


class BackgroundServer:
    """Serve an app with uvicorn on host:port (0: an ephemeral port) in a thread; `url` once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise PersonaAxisError(f"the server at {self.url} failed to start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def serve_forever(server: PersonaServer, host: str, port: int, announce: Callable[[str], None],
                  options: HttpOptions | None = None, drain_s: float = 30.0) -> None:
    """Run the server in this thread until SIGTERM or SIGINT; `announce` gets the URL once the socket is bound.
    The address is checked against the keys first (`check_exposure`). On SIGTERM the server drains: no new
    requests, those in flight get `drain_s` seconds to finish and are then cancelled, and this returns."""
    import uvicorn

    options = options or HttpOptions()
    check_exposure(host, options.keys, options.allow_unauthenticated)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise PersonaAxisError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)  # connections made right after the announcement wait for uvicorn instead of being refused
    announce(f"http://{host}:{sock.getsockname()[1]}")
    front = build_app(server, options)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit and front.loop is not None:
                print(f"persona-axis: {signal.Signals(sig).name}: no new requests; {len(front.handles)} in flight get "
                      f"up to {drain_s:g} s", file=sys.stderr, flush=True)
                front.loop.call_soon_threadsafe(front.drain, drain_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(front, log_level="warning", lifespan="on", timeout_graceful_shutdown=math.ceil(drain_s) + 5)
    # uvicorn raises the signal again once it has shut down; after a drain, SIGTERM has done its work, so the
    # handler it finds then only lets this function return (SIGINT still ends as KeyboardInterrupt).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: None) if main else None
    try:
        DrainingServer(config).run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
