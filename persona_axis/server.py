"""An OpenAI-compatible chat server with per-request capping, steering and projections (Starlette + uvicorn).

Routes: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models, GET /health,
GET /v1/persona_axis (the axis, layers and capping experiments the dashboard needs), GET /metrics and GET /
(the dashboard, static files under persona_axis/static). Requests share decode steps in one `engine.Engine`.

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

Access: with API keys (`ApiKeys`), every /v1/* route and /metrics need `Authorization: Bearer KEY` (HTTP 401
otherwise); / (the page), /static and /health stay open. Keys are compared as SHA-256 digests in constant
time, and logs and metrics name a key only by its id ("key-" and 8 hex digits of that digest).
`check_exposure` refuses an address other than loopback when there is no key, before anything is bound.

Limits: a bounded queue (HTTP 429 with Retry-After when full), a per-key limit on requests in flight (429
too), a body limit (413, checked against Content-Length up front and counted while the body is read, so an
oversized body is never held whole), a time limit for receiving the body (408: a slow upload never reaches
the engine), a per-request timeout (504, or an error event in a stream), a streamed reply whose client
takes no chunk for `write_timeout_s` is cancelled (its row freed, its connection closed), a client that
disconnects frees its row, and max_tokens is cut to `max_tokens` and to what the context leaves.
Conversations longer than the context are cut by `context_window`'s sliding window (whole oldest
messages dropped, the system message kept) until the prompt leaves MIN_REPLY_TOKENS (or max_tokens, if
fewer) for the reply, reported as persona_axis.window.dropped_messages; max_tokens is then cut to the rest.
Bad requests get HTTP 400 with a one-line message and affect nothing else.

Operations: GET /metrics (Prometheus text format, one registry per app), one JSON line per /v1 request
(`HttpOptions.log`: a file, or stderr for `persona-axis serve`) and, in `serve_forever`, SIGTERM drains:
new requests get 503, running ones get `drain_s` seconds to finish and are then cancelled, and the
process returns normally.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as MetricCounter
from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.capping import CappingConfig
from persona_axis.context_window import context_length, prompt_window
from persona_axis.engine import PREFILL_CHUNK, EndEvent, Engine, Event, QueueFull, Request, Sampling, TokenEvent
from persona_axis.errors import PersonaAxisError
from persona_axis.intervention_spec import SpecContext, ablate_item, build_interventions, cap_item, steer_item
from persona_axis.measurement import check_layer_index, measured_layer
from persona_axis.models import LoadedModel, Message
from persona_axis.monitor import LiveAlert
from persona_axis.row_interventions import RowSettings
from persona_axis.steering import Cap

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 256  # a reply's length when the request sets no max_tokens (cut to what the context leaves)
MIN_REPLY_TOKENS = 16  # room for the reply that the sliding window keeps (max_tokens, if smaller)
EXTENSION_FIELDS = ("cap", "steer", "ablate", "interventions", "projections", "layer", "ignore_eos")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MiB = 1 << 20
API_KEY_ENV = "PERSONA_AXIS_API_KEY"  # `persona-axis serve` reads one key from this variable
ANONYMOUS = "anonymous"  # the key id of every client of a server without keys
METERED_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/persona_axis", "/metrics")
ALERT_MIN_TOKENS = 4  # a reply's running mean projection counts for a drift alert from this many tokens on


@dataclass(frozen=True)
class ServerLimits:
    """max_rows: requests decoded together; max_waiting: queue length before 429; timeout_s: per request;
    prefill_chunk: prompt tokens a long prompt is prefilled per engine step (engine.PREFILL_CHUNK);
    max_body: bytes of a request body before 413; max_tokens: the most tokens a reply may ask for (None: the
    context is the only limit); per_key: requests one key may have in flight before 429 (None: no limit);
    read_timeout_s: time to receive a body before 408; write_timeout_s: time a streamed reply's client may
    take no chunk before the reply is cancelled."""

    max_rows: int = 16
    max_waiting: int = 64
    timeout_s: float = 300.0
    prefill_chunk: int = PREFILL_CHUNK
    max_body: int = 4 * MiB
    max_tokens: int | None = None
    per_key: int | None = None
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0


class ApiKeys:
    """The bearer keys a server accepts (none: no authentication). Only SHA-256 digests are kept; a key is
    named in logs and metrics by its id, "key-" and the digest's first 8 hex digits."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.digests: dict[bytes, str] = {}
        for key in keys:
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise PersonaAxisError("an API key must be a non-empty string without spaces")
            digest = hashlib.sha256(key.encode()).digest()
            self.digests[digest] = "key-" + digest.hex()[:8]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def identify(self, authorization: str | None) -> str | None:
        """The key id for an Authorization header's value, or None for a missing or unknown key. Every known
        digest is compared, in constant time, whatever matches."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for known, key_id in self.digests.items():
            if hmac.compare_digest(known, digest):
                found = key_id
        return found

    @classmethod
    def gather(cls, keys: Iterable[str] = (), env_key: str | None = None, key_file: str | Path | None = None) -> ApiKeys:
        """Keys given directly, one from an environment variable's value, and those of a file: one key a line,
        blank lines and lines starting with # ignored."""
        every = [*keys, *([env_key] if env_key else [])]
        if key_file is not None:
            try:
                lines = Path(key_file).read_text().splitlines()
            except OSError as exc:
                raise PersonaAxisError(f"cannot read the API key file {key_file}: {exc.strerror}") from None
            listed = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not listed:
                raise PersonaAxisError(f"the API key file {key_file} has no keys (one a line; # starts a comment)")
            every += listed
        return cls(every)


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback one (127.0.0.0/8, ::1; names resolved locally)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(host: str, keys: ApiKeys, allow_unauthenticated: bool = False) -> None:
    """Refuse (one line) to serve an address beyond loopback without a key, unless explicitly allowed."""
    if not keys and not allow_unauthenticated and not is_loopback(host):
        raise PersonaAxisError(f"refusing to listen on {host or 'every address'} without an API key: give --api-key, "
                               f"${API_KEY_ENV} or --api-key-file, or --allow-unauthenticated to serve anyone who "
                               "can reach it")


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP layer's own settings: keys (none: open), where request log lines go (a file, appended to, or
    an open stream such as sys.stderr; None: no request log), the mean projection below which a reply counts
    as a drift alert (None: no alerts), and whether an address beyond loopback may be served without a key."""

    keys: ApiKeys = field(default_factory=ApiKeys)
    log: Path | TextIO | None = None
    alert_below: float | None = None
    allow_unauthenticated: bool = False


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
        wanted = min(wanted, self.limits.max_tokens or wanted)
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


@dataclass
class _Trace:
    """One /v1 request as its log line reports it, filled in as it goes. finish: the reply's finish_reason,
    or how it stopped short (cancelled, error, timeout, stalled, disconnected)."""

    id: str
    key: str
    path: str
    start: float  # time.monotonic() on arrival
    status: int = 0
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    last_token: float | None = None  # time.monotonic() of the latest token
    cap: str | None = None
    alert: bool | None = None

    def line(self) -> str:
        """The JSON log line (the key's id, never the key)."""
        return json.dumps({
            "time": round(time.time(), 3), "id": self.id, "key": self.key, "path": self.path, "status": self.status,
            "finish": self.finish, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            "duration_s": round(time.monotonic() - self.start, 4), "cap": self.cap, "alert": self.alert})


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share one process)."""

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        seconds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
        self.requests = MetricCounter("persona_axis_requests", "HTTP requests by route and status",
                                      ["route", "status"], registry=r)
        self.replies = MetricCounter("persona_axis_replies", "Chat replies by how they ended", ["finish"], registry=r)
        self.prompt_tokens = MetricCounter("persona_axis_prompt_tokens", "Prompt tokens of ended replies", registry=r)
        self.completion_tokens = MetricCounter("persona_axis_completion_tokens", "Tokens generated", registry=r)
        self.first_token = Histogram("persona_axis_time_to_first_token_seconds",
                                     "From a request's arrival to its first token", buckets=seconds, registry=r)
        self.token_gap = Histogram("persona_axis_time_per_output_token_seconds",
                                   "Between a reply's consecutive tokens", buckets=seconds, registry=r)
        self.cap_share = Histogram("persona_axis_cap_engaged_share",
                                   "Per reply, the share of its tokens the cap raised (mean over the capped layers)",
                                   ["experiment"], buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.alerts = MetricCounter("persona_axis_drift_alerts", "Replies whose running mean projection fell below "
                                    "the alert threshold", ["experiment"], registry=r)
        Gauge("persona_axis_queue_length", "Requests waiting for a row", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("persona_axis_running_rows", "Requests being decoded", registry=r).set_function(lambda: engine.busy)
        self.in_flight = Gauge("persona_axis_requests_in_flight", "Chat requests from arrival to their end",
                               registry=r)


class _Refused(Exception):
    """A request body the server will not take: HTTP `status` with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(http: Any, limits: ServerLimits) -> bytes:
    """The body, read piece by piece: 413 past `max_body` (at once when Content-Length says so), 408 when it
    has not all arrived within `read_timeout_s`."""
    from starlette.requests import ClientDisconnect

    declared = http.headers.get("content-length")
    too_large = _Refused(413, f"the request body is larger than the server's limit of {limits.max_body} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
        raise too_large
    body = bytearray()
    deadline = time.monotonic() + limits.read_timeout_s
    pieces = http.stream()
    try:
        while True:
            try:
                body += await asyncio.wait_for(anext(pieces), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return bytes(body)
            except TimeoutError:
                raise _Refused(408, f"the request body did not arrive within {limits.read_timeout_s:g} s") from None
            except ClientDisconnect:
                raise _Refused(400, "the client went away before sending the whole body") from None
            if len(body) > limits.max_body:
                raise too_large
    finally:
        await pieces.aclose()


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
        self.metrics = _Metrics(server.engine)
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
        trace = _Trace(f"req-{uuid.uuid4().hex[:24]}", key or "-", path, time.monotonic())

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

    def record(self, trace: _Trace) -> None:
        """A request is over: count it and write its log line (scrapes of /metrics are counted, not logged)."""
        route = trace.path if trace.path in METERED_ROUTES else "other"
        self.metrics.requests.labels(route, str(trace.status)).inc()
        if trace.finish is not None:
            self.metrics.replies.labels(trace.finish).inc()
        if self.log is not None and trace.path != "/metrics":
            print(trace.line(), file=self.log, flush=True)

    def ended(self, trace: _Trace, request: ChatRequest, end: EndEvent) -> None:
        """A reply's end event: its tokens, cap engagement and drift alert into the trace and the metrics."""
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
        trace: _Trace = http.scope["persona_axis.trace"]
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

    async def _complete(http: HttpRequest, trace: _Trace, hold: _Hold) -> tuple[Any, bool]:
        """The response, and whether it is a stream (which then releases `hold` itself)."""
        try:
            raw = await _read_body(http, limits)
        except _Refused as exc:
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


def _timed(response: Any, chunks: Any, trace: _Trace, release: Callable[[], None], timeout_s: float) -> Any:
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


async def _stream(front: ServerApp, request: ChatRequest, trace: _Trace, http: Any, release: Callable[[], None],
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
                token = {"projection": event.projection, "capped_layers": list(event.capped_layers)}
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
