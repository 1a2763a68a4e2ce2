"""An OpenAI-compatible chat server with per-request capping, steering and projections (Starlette + uvicorn).

Routes: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models, GET /health,
GET /v1/persona_axis (the axis, layers and capping experiments the dashboard needs), GET /metrics and GET /
(the dashboard, static files under persona_axis/apps/static). Requests share decode steps in one `engine.Engine`.
/v1/persona_axis: {model, name, n_layers, context, axis (false: started without one, plain completions only),
default_layer, experiments: [{id, caps: [{layer, floor,
default_mean}]}]}, default_mean being the calibrated mean default-Assistant projection at that cap's layer
(CapLayer.stats, null where calibration did not record it); the dashboard's alert threshold defaults to it.

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

import hashlib
import json
import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.control.capping import CappingConfig
from persona_axis.control.spec import SpecContext, ablate_item, build_interventions, cap_item, steer_item
from persona_axis.decode.engine import PREFILL_CHUNK, Engine
from persona_axis.decode.interventions import Cap, Intervention
from persona_axis.decode.requests import EndEvent, Sampling
from persona_axis.decode.row_interventions import Guard, RowSettings
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index, measured_layer
from persona_axis.model.context_window import context_length, prompt_window
from persona_axis.model.loading import LoadedModel, Message

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 256  # a reply's length when the request sets no max_tokens (cut to what the context leaves)
MIN_REPLY_TOKENS = 16  # room for the reply that the sliding window keeps (max_tokens, if smaller)
EXTENSION_FIELDS = ("cap", "steer", "ablate", "interventions", "projections", "layer", "ignore_eos", "guard",
                    "conversation")
GUARD_MEMORY = 10_000  # conversations remembered as guarded (the oldest are forgotten first)
Layered = dict[int, list[Intervention]]  # interventions by layer
GUARD_MIN_TOKENS = 4  # a guard reads a reply's running mean projection from this many tokens on
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MiB = 1 << 20


@dataclass(frozen=True)
class GuardDefault:
    """`serve --guard BELOW[@LAYER]`: requests that name a cap and no guard of their own get this one."""

    below: float
    layer: int | None = None


def parse_guard(text: str) -> GuardDefault:
    """"BELOW" or "BELOW@LAYER" (`serve --guard`); a one-line error otherwise."""
    below, _, layer = text.partition("@")
    try:
        return GuardDefault(float(below), int(layer) if layer else None)
    except ValueError:
        raise PersonaAxisError(f"--guard takes BELOW or BELOW@LAYER (a number, a layer index), not {text!r}") from None


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
    guard: dict[str, Any] | None = None  # {"below", "from_start"}: the cap waits for the drift guard, or acts at once
    conversation: str | None = None  # the client's name for the conversation, if it gave one
    messages: list[Message] = field(default_factory=list)  # as the client sent them (before the sliding window)


class BadRequest(PersonaAxisError):
    """A request the server refuses with HTTP 400."""


def _conversation_key(messages: list[Message]) -> str:
    """A digest of a conversation's messages (role and content), naming it across its turns."""
    return hashlib.sha256(json.dumps([[m["role"], m["content"]] for m in messages]).encode()).hexdigest()


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


def _finite(value: Any) -> float | None:
    """A finite number as a float, else None (JSON has no NaN)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


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
    """The model, its axis and capping config behind the HTTP routes, with one engine thread. Without an axis
    (None) it serves plain chat completions: a request's persona_axis object is refused."""

    def __init__(self, lm: LoadedModel, axis: Axis | None, config: CappingConfig | None = None,
                 limits: ServerLimits | None = None, model_id: str = "persona-axis",
                 defaults: Tensor | None = None, guard: GuardDefault | None = None) -> None:
        """defaults [layers, hidden]: the run's mean default-Assistant activation (norm-relative steering and
        'default' values need it; spec.run_defaults reads it from a run directory). guard: the drift guard
        requests with a cap get unless they say otherwise."""
        if axis is None and (config is not None or guard is not None):
            raise PersonaAxisError("a capping config or a drift guard needs an axis")
        if config is not None:
            config.check_model(lm)
        self.lm, self.axis, self.config, self.model_id = lm, axis, config, model_id
        self.spec = None if axis is None else SpecContext(lm, axis, config=config, defaults=defaults)
        self.limits = limits or ServerLimits()
        self.context = context_length(lm)
        self.engine = Engine(lm, self.limits.max_rows, self.limits.max_waiting, self.limits.prefill_chunk)
        self.thread: threading.Thread | None = None
        self.guard_default = guard
        self.guarded: OrderedDict[str, None] = OrderedDict()  # conversations whose guard fired: capped from the start
        self.guard_lock = threading.Lock()

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
        chat = messages_in = [_content(m, i) for i, m in enumerate(messages)]
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
        default = self.guard_default
        if default is not None and default.layer is not None and extension.get("cap") is not None \
                and "guard" not in extension and "layer" not in extension:
            extension = {**extension, "layer": default.layer}  # the default guard reads its own layer
        settings, capped, others, cap, floor, layer, projections = self._extension(extension)
        settings, guard, conversation = self._guard(extension, messages_in, settings, capped, others, layer)
        sampling = Sampling(max_new_tokens=max(1, min(wanted, self.context - len(prompt_ids))),
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed, stop_texts=tuple(stops),
                            ignore_eos=bool(extension.get("ignore_eos", False)))
        options = body.get("stream_options") or {}
        return ChatRequest(prompt_ids, sampling, settings, bool(body.get("stream", False)),
                           bool(isinstance(options, dict) and options.get("include_usage")), projections, layer, cap,
                           floor, dropped, guard, conversation, messages_in)

    def _extension(self, ext: dict[str, Any]) -> tuple[RowSettings, Layered, Layered, str | None, float | None,
                                                       int | None, str | None]:
        """The persona_axis object: interventions (intervention_spec items, or the shorthands "cap": an
        experiment id, "steer" and "ablate": lists of items of that kind or of CLI strings) and what to report.
        Returns the settings, the cap's interventions and the others apart (a guard holds back the first)."""
        unknown = set(ext) - set(EXTENSION_FIELDS)
        if unknown:
            raise BadRequest(f"unknown persona_axis field(s) {sorted(unknown)}: use {', '.join(EXTENSION_FIELDS)}")
        if self.spec is None or self.axis is None:
            if set(ext) - {"ignore_eos"}:
                raise BadRequest(f"this server has no axis (started without --axis): persona_axis.{sorted(ext)[0]} "
                                 f"needs one")
            return RowSettings({}, None), {}, {}, None, None, None, None
        items: list[Any] = []
        cap = ext.get("cap")
        if cap is not None and self.config is None:
            raise BadRequest("this server has no capping config: start it with --config (or an --axis run "
                             "directory that has one)")
        for key, from_text in (("steer", steer_item), ("ablate", ablate_item)):
            listed = ext.get(key) or []
            if not isinstance(listed, list):
                raise BadRequest(f"persona_axis.{key} must be a list of objects (e.g. {{\"layer\": 2, ...}}) or strings")
            items += [from_text(e) if isinstance(e, str) else {**e, "kind": key} if isinstance(e, dict) else e
                      for e in listed]
        generic = ext.get("interventions") or []
        if not isinstance(generic, list):
            raise BadRequest("persona_axis.interventions must be a list of {\"kind\": ..., ...} objects")
        capped = build_interventions(self.spec, [cap_item(str(cap))]) if cap is not None else {}
        others = build_interventions(self.spec, items + generic)
        interventions = {layer: [*others.get(layer, []), *capped.get(layer, [])] for layer in {*others, *capped}}
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
        settings = RowSettings(interventions, watch)
        return settings, capped, others, cap_name, floor, (layer if projections else None), projections

    def _guard(self, ext: dict[str, Any], chat: list[Message], settings: RowSettings, capped: Layered,
               others: Layered, layer: int | None) -> tuple[RowSettings, dict[str, Any] | None, str | None]:
        """The drift guard: "guard": {"below": T} (or the server's default, for requests with a cap; null: none)
        holds the cap back until the reply's running mean projection at the watched layer falls below T. A
        conversation whose guard fired (named by "conversation", else by its messages) is capped from the
        start of its later turns. Returns the settings to run, the response's guard object and the key under
        which a firing is remembered."""
        asked = ext.get("guard", "default")
        if asked == "default":
            default = self.guard_default
            asked = None if default is None or not capped else {"below": default.below, "layer": default.layer}
        named = ext.get("conversation")
        if named is not None and (not isinstance(named, str) or not named):
            raise BadRequest("persona_axis.conversation must be a non-empty string")
        if asked is None:
            return settings, None, None
        if not isinstance(asked, dict) or set(asked) - {"below", "layer", "min_tokens"} or "below" not in asked:
            raise BadRequest('persona_axis.guard must be {"below": number, "layer"?: int, "min_tokens"?: int} or null')
        if not capped:
            raise BadRequest("persona_axis.guard holds back a cap: name one with persona_axis.cap")
        below = _number(asked, "below", 0.0, -1e30, 1e30)
        if settings.watch is None or (asked.get("layer") is not None and asked["layer"] != layer):
            raise BadRequest("persona_axis.guard reads the projections: keep them on (\"projections\": \"token\" or "
                             "\"turn\") and give the guard the same layer as persona_axis.layer")
        history = named if named is not None else _conversation_key(chat[:-1])
        with self.guard_lock:
            if history in self.guarded:  # an earlier turn drifted: the cap acts at once
                self.guarded.move_to_end(history)
                return settings, {"below": below, "from_start": True}, named
        min_tokens = _integer(asked.get("min_tokens", GUARD_MIN_TOKENS), "persona_axis.guard.min_tokens", 1)
        guard = Guard(below, capped, min_tokens)
        return RowSettings(others, settings.watch, guard), {"below": below, "from_start": False}, named

    def remember_guard(self, request: ChatRequest, end: EndEvent) -> None:
        """After a reply whose guard fired: its conversation's later turns are capped from the start."""
        if request.guard is None or end.guard_fired_at is None:
            return
        key = request.conversation or _conversation_key([*request.messages, {"role": "assistant", "content": end.text}])
        with self.guard_lock:
            self.guarded[key] = None
            self.guarded.move_to_end(key)
            while len(self.guarded) > GUARD_MEMORY:
                self.guarded.popitem(last=False)

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
        if request.guard is not None:
            out["guard"] = {**request.guard, "fired_at": end.guard_fired_at}
        return out

    def info(self) -> dict[str, Any]:
        experiments = [] if self.config is None else [
            {"id": e.id, "caps": [{"layer": c.layer, "floor": c.floor, "default_mean": _finite(c.stats.get("default_mean"))}
                                  for c in e.caps]}
            for e in self.config.experiments.values()]
        return {"model": self.model_id, "name": self.lm.name, "n_layers": self.lm.n_layers, "context": self.context,
                "axis": self.axis is not None,
                "default_layer": None if self.axis is None else measured_layer(self.axis, []),
                "experiments": experiments}
