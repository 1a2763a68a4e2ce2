"""The server's HTTP layer (Starlette + uvicorn): routes, keys and limits, streaming, metrics and request logs,
and serving until SIGTERM (see server.py for the routes and the request extension)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from persona_axis.apps.server import STATIC, ChatRequest, PersonaServer
from persona_axis.apps.server_access import ANONYMOUS, ApiKeys, Refused, read_body
from persona_axis.apps.server_metrics import Metrics, Trace
from persona_axis.control.monitor import LiveAlert
from persona_axis.decode.requests import EndEvent, Event, QueueFull, Request, TokenEvent
from persona_axis.errors import PersonaAxisError

METERED_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/persona_axis", "/metrics")
ALERT_MIN_TOKENS = 4  # a reply's running mean projection counts for a drift alert from this many tokens on


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP layer's own settings: keys (none: open), where request log lines go (a file, appended to, or
    an open stream such as sys.stderr; None: no request log), the mean projection below which a reply counts
    as a drift alert (None: no alerts), and whether an address beyond loopback may be served without a key."""

    keys: ApiKeys = field(default_factory=ApiKeys)
    log: Path | TextIO | None = None
    alert_below: float | None = None
    allow_unauthenticated: bool = False


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
               429: "rate_limit_exceeded", 503: "server_error", 504: "timeout"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """An OpenAI-style error body: {"error": {"message", "type"[, "code"]}}."""
    from starlette.responses import JSONResponse

    error = {"message": message, "type": ERROR_TYPES.get(status, "server_error")}
    if status == 401:
        error["code"] = "invalid_api_key"
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _usage(end: EndEvent) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": len(end.token_ids),
            "total_tokens": end.prompt_tokens + len(end.token_ids)}


class _Stalled(Exception):
    """A streamed chunk was not taken by the client in time."""


class _Hold:
    """A request's place in its key's count from arrival to its end, and its engine request once submitted.
    `release` (safe to repeat) cancels that (a no-op once it has ended, else its row is freed) and stops counting."""

    def __init__(self, front: ServerApp, key: str) -> None:
        self.front, self.key = front, key
        self.handle: Request | None = None
        self.held = True
        front.active[key] += 1

    def attach(self, handle: Request) -> None:
        self.handle = handle
        self.front.handles[id(self)] = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if self.held:
            self.held = False
            self.front.handles.pop(id(self), None)
            self.front.active[self.key] -= 1
            if not self.front.active[self.key]:
                del self.front.active[self.key]


class ServerApp:
    """The ASGI application: the Starlette routes behind keys, per-key limits, metrics, the request log and
    draining (`drain`, called in the event loop's thread: `serve_forever` does it on SIGTERM). `build_app`
    makes one per server."""

    def __init__(self, server: PersonaServer, options: HttpOptions) -> None:
        self.server, self.options = server, options
        self.metrics = Metrics(server.engine)
        self.active: Counter[str] = Counter()  # requests in flight by key id
        self.metrics.in_flight.set_function(lambda: sum(self.active.values()))
        self.handles: dict[int, Request] = {}  # the engine requests in flight, by id() of their _Hold
        self.draining = False
        self.log: TextIO | None = None
        self.owns_log = False  # the log is a file opened here
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app: Any = None  # the Starlette application, set by build_app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path == "/metrics"):
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        key = self.options.keys.identify(authorization) if self.options.keys else ANONYMOUS
        trace = Trace(f"req-{uuid.uuid4().hex[:24]}", key or "-", path, time.monotonic())

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                trace.status = message["status"]
            await send(message)

        try:
            if key is None:
                refusal = _error(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                                 {"WWW-Authenticate": "Bearer"})
                await refusal(scope, receive, sending)
            else:
                await self.app({**scope, "persona_axis.trace": trace}, receive, sending)
        finally:
            self.record(trace)

    def open(self) -> None:
        """At startup, in the event loop's thread."""
        self.loop = asyncio.get_running_loop()
        if isinstance(self.options.log, Path):
            self.log, self.owns_log = open(self.options.log, "a", encoding="utf-8"), True  # closed by close()
        else:
            self.log = self.options.log

    def close(self) -> None:
        if self.owns_log and self.log is not None:
            self.log.close()

    def record(self, trace: Trace) -> None:
        """A request is over: count it and write its log line (scrapes of /metrics are counted, not logged)."""
        route = trace.path if trace.path in METERED_ROUTES else "other"
        self.metrics.requests.labels(route, str(trace.status)).inc()
        if trace.finish is not None:
            self.metrics.replies.labels(trace.finish).inc()
        if self.log is not None and trace.path != "/metrics":
            print(trace.line(), file=self.log, flush=True)

    def ended(self, trace: Trace, request: ChatRequest, end: EndEvent) -> None:
        """A reply's end event: its tokens, cap engagement and drift alert into the trace and the metrics; a fired
        drift guard into the server's memory of guarded conversations."""
        self.server.remember_guard(request, end)
        if end.guard_fired_at is not None:
            self.metrics.guard_fired.labels(request.cap or "custom").inc()
        trace.finish, trace.prompt_tokens, trace.completion_tokens = end.reason, end.prompt_tokens, len(end.token_ids)
        self.metrics.prompt_tokens.inc(end.prompt_tokens)
        self.metrics.completion_tokens.inc(len(end.token_ids))
        if end.engaged:
            share = sum(end.engaged.values()) / len(end.engaged)
            self.metrics.cap_share.labels(request.cap or "custom").observe(share)
        threshold = self.options.alert_below
        if threshold is not None and request.projections and end.projections:
            watch = LiveAlert(threshold, ALERT_MIN_TOKENS)
            trace.alert = any([watch.update(value) for value in end.projections])
            if trace.alert:
                self.metrics.alerts.labels(request.cap or "none").inc()

    def drain(self, seconds: float) -> None:
        """Stop admitting requests; cancel those still in flight after `seconds`."""
        assert self.loop is not None
        self.draining = True
        self.loop.call_later(seconds, self.cancel_all)

    def cancel_all(self) -> None:
        for handle in list(self.handles.values()):
            handle.cancel()


def build_app(server: PersonaServer, options: HttpOptions | None = None) -> ServerApp:
    """The ASGI application; the engine thread starts and stops with it."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request as HttpRequest
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    front = ServerApp(server, options or HttpOptions())
    limits = server.limits

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        server.start()
        front.open()
        try:
            yield
        finally:
            server.stop()
            front.close()

    async def health(_request: HttpRequest) -> Any:
        return JSONResponse({"status": "ok", "running": server.engine.busy, "waiting": len(server.engine.waiting),
                             "prefilling": int(server.engine.prefilling is not None),
                             "ended": dict(server.engine.ended)})

    async def models(_request: HttpRequest) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                                          "owned_by": "persona-axis"}]})

    async def info(_request: HttpRequest) -> Any:
        return JSONResponse(server.info())

    async def metrics(_request: HttpRequest) -> Any:
        return Response(generate_latest(front.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(_request: HttpRequest) -> Any:
        return FileResponse(STATIC / "index.html")

    async def completions(http: HttpRequest) -> Any:
        trace: Trace = http.scope["persona_axis.trace"]
        if front.draining:
            return _error(503, "the server is shutting down: send the request again elsewhere or later",
                          {"Connection": "close"})
        if limits.per_key is not None and front.active[trace.key] >= limits.per_key:
            return _error(429, f"{trace.key} already has {front.active[trace.key]} requests in flight, the most one "
                               "key may have: try again shortly", {"Retry-After": "1"})
        hold = _Hold(front, trace.key)  # counts from here, the body's upload included
        try:
            response, streamed = await _complete(http, trace, hold)
        except BaseException:
            hold.release()
            raise
        if not streamed:
            hold.release()
        return response

    async def _complete(http: HttpRequest, trace: Trace, hold: _Hold) -> tuple[Any, bool]:
        """The response, and whether it is a stream (which then releases `hold` itself)."""
        try:
            raw = await read_body(http, limits)
        except Refused as exc:
            return _error(exc.status, str(exc), {"Connection": "close"}), False  # the rest is never read
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the body is not valid JSON: {exc}"), False
        try:
            request = server.parse(body)
        except PersonaAxisError as exc:
            return _error(400, str(exc).splitlines()[0]), False
        trace.cap = request.cap
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def arrive(event: Event) -> None:
            if isinstance(event, TokenEvent):
                now = time.monotonic()
                if trace.last_token is None:
                    trace.first_token_s = now - trace.start
                    front.metrics.first_token.observe(trace.first_token_s)
                else:
                    front.metrics.token_gap.observe(now - trace.last_token)
                trace.last_token = now
            events.put_nowait(event)

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(arrive, event)

        try:
            hold.attach(server.engine.submit(request.prompt_ids, request.sampling, request.settings, deliver))
        except QueueFull as exc:
            return _error(429, str(exc), {"Retry-After": "1"}), False
        deadline = time.monotonic() + limits.timeout_s
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        trace.id = reply_id
        if request.stream:
            chunks = _stream(front, request, trace, http, hold.release, events, deadline, reply_id, created)
            response = StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                         background=BackgroundTask(hold.release))  # runs after a disconnect too
            return _timed(response, chunks, trace, hold.release, limits.write_timeout_s), True
        end = await _wait_end(http, events, deadline)
        if end is None:
            trace.finish = "timeout" if time.monotonic() >= deadline else "disconnected"
            return _error(504, f"the reply took longer than the server's {limits.timeout_s:g} s timeout"), False
        front.ended(trace, request, end)
        if end.reason == "cancelled" and front.draining:
            return _error(503, "the server shut down before the reply was finished"), False
        if end.reason in ("error", "cancelled"):
            return _error(500, f"generation failed: {end.error or end.reason}"), False
        return JSONResponse({
            "id": reply_id, "object": "chat.completion", "created": created, "model": server.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text},
                         "finish_reason": end.reason}],
            "usage": _usage(end), "persona_axis": server.summary(request, end)}), False

    routes = [Route("/", index), Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/persona_axis", info), Route("/v1/chat/completions", completions, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    front.app = Starlette(routes=routes, lifespan=lifespan)
    return front


def _timed(response: Any, chunks: Any, trace: Trace, release: Callable[[], None], timeout_s: float) -> Any:
    """The streamed response as an ASGI callable whose every send must complete within `timeout_s`: a client
    that takes nothing for that long gets its reply cancelled (the row freed) and its connection dropped (the
    response is left unfinished, so uvicorn closes it)."""

    async def respond(scope: Any, receive: Any, send: Any) -> None:
        async def timed_send(message: Any) -> None:
            try:
                await asyncio.wait_for(send(message), timeout_s)
            except TimeoutError:
                raise _Stalled from None

        try:
            await response(scope, receive, timed_send)
        except _Stalled:
            trace.finish = "stalled"
            release()
            await chunks.aclose()
            return
        if trace.finish is None:
            trace.finish = "disconnected"

    return respond


class _Gone(Exception):
    """The client disconnected."""


async def _next_event(http: Any, events: asyncio.Queue[Event], deadline: float) -> Event | None:
    """The request's next event; None at the deadline; _Gone when the client has disconnected meanwhile."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return await asyncio.wait_for(events.get(), timeout=min(left, 0.5))
        except TimeoutError:
            if await http.is_disconnected():
                raise _Gone from None


async def _wait_end(http: Any, events: asyncio.Queue[Event], deadline: float) -> EndEvent | None:
    """The request's end event; None at the deadline or when the client has gone."""
    try:
        while True:
            event = await _next_event(http, events, deadline)
            if event is None or isinstance(event, EndEvent):
                return event
    except _Gone:
        return None


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _stream(front: ServerApp, request: ChatRequest, trace: Trace, http: Any, release: Callable[[], None],
                  events: asyncio.Queue[Event], deadline: float, reply_id: str, created: int) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI clients read them: a role chunk, one chunk per token, a finish chunk,
    a usage chunk when asked, then [DONE]. A disconnect (the generator is closed) frees the row."""
    server = front.server
    head = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": server.model_id}

    def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        while True:
            event = await _next_event(http, events, deadline)
            if event is None:
                trace.finish = "timeout"
                yield _sse({"error": {"message": f"the reply took longer than the server's "
                                                 f"{server.limits.timeout_s:g} s timeout", "type": "timeout"}})
                return
            if isinstance(event, TokenEvent):
                sent += event.text
                token = {"projection": event.projection, "capped_layers": list(event.capped_layers),
                         **({"guard_fired": True} if event.guard_fired else {})}
                yield chunk({"content": event.text}, persona_axis=token if request.projections == "token" else None)
                continue
            front.ended(trace, request, event)
            if event.reason in ("error", "cancelled"):
                message = ("the server shut down before the reply was finished" if event.reason == "cancelled"
                           and front.draining else f"generation failed: {event.error or event.reason}")
                yield _sse({"error": {"message": message, "type": "server_error"}})
                return
            rest = event.text[len(sent):] if event.text.startswith(sent) else ""
            yield chunk({"content": rest} if rest else {}, event.reason, persona_axis=server.summary(request, event))
            if request.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield b"data: [DONE]\n\n"
            return
    except _Gone:
        trace.finish = "disconnected"
        return
    finally:
        release()
