"""An OpenAI-compatible chat server with per-request capping, steering and projections (Starlette + uvicorn).

Routes: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models, GET /health,
GET /v1/persona_axis (the axis, layers and capping experiments the dashboard needs) and GET / (the
dashboard, static files under persona_axis/static). Requests share decode steps in one `engine.Engine`.

The request extension `"persona_axis": {...}` (all fields optional):
  cap: a capping experiment id of the server's config (e.g. "layers_21:26-p0.25"), or null for none;
  steer: [{"layer": L, "coef": C}, ...] adds C × the axis at layer L (axis units, as `--steer C@L`);
  projections: "token" (default: one per generated token, streamed with each chunk), "turn" (their mean
    only) or null (none);
  layer: where projections are read (default: as `persona-axis chat` picks it, below the interventions);
    they are read BEFORE that layer's own interventions, i.e. the value a cap there compares to its floor;
  ignore_eos: true runs every reply to max_tokens (load tests).
Responses carry "persona_axis": {layer, cap, floor (the cap's floor at `layer`, if any), projections or
projection, cap_engaged {layer: share of tokens the cap raised}, window}. Streamed chunks carry
{"projection", "capped_layers"} per token.

Limits: a bounded queue (HTTP 429 with Retry-After when full), a per-request timeout (504, or an error
event in a stream), a client that disconnects frees its row, and max_tokens is cut to what the context
leaves. Conversations longer than the context are cut by `context_window`'s sliding window (whole oldest
messages dropped, the system message kept) until the prompt leaves MIN_REPLY_TOKENS (or max_tokens, if
fewer) for the reply, reported as persona_axis.window.dropped_messages; max_tokens is then cut to the rest.
Bad requests get HTTP 400 with a one-line message and affect nothing else.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.capping import CappingConfig
from persona_axis.context_window import context_length, prompt_window
from persona_axis.engine import PREFILL_CHUNK, EndEvent, Engine, Event, QueueFull, Sampling, TokenEvent
from persona_axis.errors import PersonaAxisError
from persona_axis.intervention_spec import SpecContext, ablate_item, build_interventions, cap_item, steer_item
from persona_axis.measurement import check_layer_index, measured_layer
from persona_axis.models import LoadedModel, Message
from persona_axis.row_interventions import RowSettings
from persona_axis.steering import Cap

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 256  # a reply's length when the request sets no max_tokens (cut to what the context leaves)
MIN_REPLY_TOKENS = 16  # room for the reply that the sliding window keeps (max_tokens, if smaller)
EXTENSION_FIELDS = ("cap", "steer", "ablate", "interventions", "projections", "layer", "ignore_eos")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ServerLimits:
    """max_rows: requests decoded together; max_waiting: queue length before 429; timeout_s: per request;
    prefill_chunk: prompt tokens a long prompt is prefilled per engine step (engine.PREFILL_CHUNK)."""

    max_rows: int = 16
    max_waiting: int = 64
    timeout_s: float = 300.0
    prefill_chunk: int = PREFILL_CHUNK


@dataclass
class ChatRequest:
    """A validated chat-completions request, ready for the engine."""

    prompt_ids: list[int]
    sampling: Sampling
    settings: RowSettings
    stream: bool
    include_usage: bool
    projections: str | None
    layer: int | None
    cap: str | None
    floor: float | None
    dropped_messages: int


class BadRequest(PersonaAxisError):
    """A request the server refuses with HTTP 400."""


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number in [{low}, {high}], not {value!r}")
    return float(value)


def _integer(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"'{what}' must be an integer >= {low}, not {value!r}")
    return value


def _content(message: Any, i: int) -> Message:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise BadRequest(f"messages[{i}] needs a role ({', '.join(ROLES)}) and content")
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
    return {"role": ROLES[message["role"]], "content": content}


class PersonaServer:
    """The model, its axis and capping config behind the HTTP routes, with one engine thread."""

    def __init__(self, lm: LoadedModel, axis: Axis, config: CappingConfig | None = None,
                 limits: ServerLimits | None = None, model_id: str = "persona-axis",
                 defaults: Tensor | None = None) -> None:
        """defaults [layers, hidden]: the run's mean default-Assistant activation (norm-relative steering and
        'default' values need it; intervention_spec.run_defaults reads it from a run directory)."""
        axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
        if config is not None:
            config.check_model(lm)
        self.lm, self.axis, self.config, self.model_id = lm, axis, config, model_id
        self.spec = SpecContext(lm, axis, config=config, defaults=defaults)
        self.limits = limits or ServerLimits()
        self.context = context_length(lm)
        self.engine = Engine(lm, self.limits.max_rows, self.limits.max_waiting, self.limits.prefill_chunk)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.engine.run_forever, name="persona-axis-engine", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.engine.close()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    # -- parsing ----------------------------------------------------------------------------------

    def parse(self, body: Any) -> ChatRequest:
        """Validate a chat-completions body; BadRequest (one line) on anything malformed."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        chat = [_content(m, i) for i, m in enumerate(messages)]
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported")
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        wanted = DEFAULT_MAX_TOKENS if requested is None else _integer(requested, "max_tokens", 1)
        chat, dropped = prompt_window(self.lm, chat, self.context - min(wanted, MIN_REPLY_TOKENS))
        prompt_ids = self.lm.prompt_ids(chat)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
        seed = body.get("seed")
        seed = int.from_bytes(uuid.uuid4().bytes[:4], "little") if seed is None else _integer(seed, "seed", 0)
        extension = body.get("persona_axis") or {}
        if not isinstance(extension, dict):
            raise BadRequest("'persona_axis' must be an object")
        settings, cap, floor, layer, projections = self._extension(extension)
        sampling = Sampling(max_new_tokens=max(1, min(wanted, self.context - len(prompt_ids))),
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed, stop_texts=tuple(stops),
                            ignore_eos=bool(extension.get("ignore_eos", False)))
        options = body.get("stream_options") or {}
        return ChatRequest(prompt_ids, sampling, settings, bool(body.get("stream", False)),
                           bool(isinstance(options, dict) and options.get("include_usage")), projections, layer, cap,
                           floor, dropped)

    def _extension(self, ext: dict[str, Any]) -> tuple[RowSettings, str | None, float | None, int | None, str | None]:
        """The persona_axis object: interventions (intervention_spec items, or the shorthands "cap": an
        experiment id, "steer" and "ablate": lists of items of that kind or of CLI strings) and what to report."""
        unknown = set(ext) - set(EXTENSION_FIELDS)
        if unknown:
            raise BadRequest(f"unknown persona_axis field(s) {sorted(unknown)}: use {', '.join(EXTENSION_FIELDS)}")
        items: list[Any] = []
        cap = ext.get("cap")
        if cap is not None:
            if self.config is None:
                raise BadRequest("this server has no capping config: start it with --config (or an --axis run "
                                 "directory that has one)")
            items.append(cap_item(str(cap)))
        for key, from_text in (("steer", steer_item), ("ablate", ablate_item)):
            listed = ext.get(key) or []
            if not isinstance(listed, list):
                raise BadRequest(f"persona_axis.{key} must be a list of objects (e.g. {{\"layer\": 2, ...}}) or strings")
            items += [from_text(e) if isinstance(e, str) else {**e, "kind": key} if isinstance(e, dict) else e
                      for e in listed]
        generic = ext.get("interventions") or []
        if not isinstance(generic, list):
            raise BadRequest("persona_axis.interventions must be a list of {\"kind\": ..., ...} objects")
        interventions = build_interventions(self.spec, items + generic)
        projections = ext.get("projections", "token")
        if projections not in ("token", "turn", None):
            raise BadRequest(f"persona_axis.projections must be \"token\", \"turn\" or null, not {projections!r}")
        asked = ext.get("layer")
        if asked is not None:
            layer = check_layer_index(_integer(asked, "persona_axis.layer", 0), self.lm.n_layers, "persona_axis.layer")
        else:
            layer = measured_layer(self.axis, interventions)
        watch = (layer, self.axis.unit(layer)) if projections else None
        floor = next((item.floor for item in interventions.get(layer, []) if isinstance(item, Cap)), None)
        cap_name = None if cap is None else str(cap)
        return RowSettings(interventions, watch), cap_name, floor, (layer if projections else None), projections

    # -- responses --------------------------------------------------------------------------------

    def summary(self, request: ChatRequest, end: EndEvent) -> dict[str, Any]:
        """The response's persona_axis object."""
        out: dict[str, Any] = {"layer": request.layer, "cap": request.cap, "floor": request.floor,
                               "cap_engaged": {str(k): v for k, v in sorted(end.engaged.items())},
                               "window": {"dropped_messages": request.dropped_messages}}
        if request.projections == "token":
            out["projections"] = end.projections
        if request.projections:
            out["projection"] = sum(end.projections) / len(end.projections) if end.projections else None
        return out

    def info(self) -> dict[str, Any]:
        experiments = [] if self.config is None else [
            {"id": e.id, "caps": [{"layer": c.layer, "floor": c.floor} for c in e.caps]}
            for e in self.config.experiments.values()]
        return {"model": self.model_id, "name": self.lm.name, "n_layers": self.lm.n_layers, "context": self.context,
                "default_layer": measured_layer(self.axis, []), "experiments": experiments}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded", 504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _usage(end: EndEvent) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": len(end.token_ids),
            "total_tokens": end.prompt_tokens + len(end.token_ids)}


def build_app(server: PersonaServer) -> Any:
    """The Starlette application; the engine thread starts and stops with it."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    async def health(_request: Request) -> Any:
        return JSONResponse({"status": "ok", "running": server.engine.busy, "waiting": len(server.engine.waiting),
                             "prefilling": int(server.engine.prefilling is not None),
                             "ended": dict(server.engine.ended)})

    async def models(_request: Request) -> Any:
        return JSONResponse({"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                                          "owned_by": "persona-axis"}]})

    async def info(_request: Request) -> Any:
        return JSONResponse(server.info())

    async def index(_request: Request) -> Any:
        return FileResponse(STATIC / "index.html")

    async def completions(http: Request) -> Any:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the body is not valid JSON: {exc}")
        try:
            request = server.parse(body)
        except PersonaAxisError as exc:
            return _error(400, str(exc).splitlines()[0])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = server.engine.submit(request.prompt_ids, request.sampling, request.settings, deliver)
        except QueueFull as exc:
            return _error(429, str(exc), {"Retry-After": "1"})
        deadline = time.monotonic() + server.limits.timeout_s
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if request.stream:
            return StreamingResponse(_stream(server, request, http, handle.cancel, events, deadline, reply_id, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(handle.cancel))  # runs after a disconnect too
        try:
            end = await _wait_end(http, events, deadline)
        finally:
            handle.cancel()  # no-op once ended; frees the row after a timeout or a disconnect
        if end is None:
            return _error(504, f"the reply took longer than the server's {server.limits.timeout_s:g} s timeout")
        if end.reason in ("error", "cancelled"):
            return _error(500, f"generation failed: {end.error or end.reason}")
        return JSONResponse({
            "id": reply_id, "object": "chat.completion", "created": created, "model": server.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text},
                         "finish_reason": end.reason}],
            "usage": _usage(end), "persona_axis": server.summary(request, end)})

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/persona_axis", info), Route("/v1/chat/completions", completions, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, lifespan=lifespan)


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


async def _stream(server: PersonaServer, request: ChatRequest, http: Any, cancel: Callable[[], None],
                  events: asyncio.Queue[Event], deadline: float, reply_id: str, created: int) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI clients read them: a role chunk, one chunk per token, a finish chunk,
    a usage chunk when asked, then [DONE]. A disconnect (the generator is closed) frees the row."""
    head = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": server.model_id}

    def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        while True:
            event = await _next_event(http, events, deadline)
            if event is None:
                yield _sse({"error": {"message": f"the reply took longer than the server's "
                                                 f"{server.limits.timeout_s:g} s timeout", "type": "timeout"}})
                return
            if isinstance(event, TokenEvent):
                sent += event.text
                token = {"projection": event.projection, "capped_layers": list(event.capped_layers)}
                yield chunk({"content": event.text}, persona_axis=token if request.projections == "token" else None)
                continue
            if event.reason in ("error", "cancelled"):
                yield _sse({"error": {"message": f"generation failed: {event.error or event.reason}",
                                      "type": "server_error"}})
                return
            rest = event.text[len(sent):] if event.text.startswith(sent) else ""
            yield chunk({"content": rest} if rest else {}, event.reason, persona_axis=server.summary(request, event))
            if request.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield b"data: [DONE]\n\n"
            return
    except _Gone:
        return
    finally:
        cancel()


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


def serve_forever(server: PersonaServer, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Run the server in this thread until interrupted; `announce` gets the URL once the socket is bound."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise PersonaAxisError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)  # connections made right after the announcement wait for uvicorn instead of being refused
    announce(f"http://{host}:{sock.getsockname()[1]}")
    uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning", lifespan="on",
                                                             timeout_graceful_shutdown=5)).run(sockets=[sock])
