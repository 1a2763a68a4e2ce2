"""An open-ended continuous batch for serving: requests join while others decode, and leave when done.

Unlike `batching.ContinuousBatch` (a fixed list of prompts with one set of interventions), the
engine takes requests at any time (`submit`), each with its own sampling settings, caps, steering
and watched layer (`row_interventions`). Every `step` admits waiting requests into free slots
(one prefill pass for all of them), then feeds every running row its pending token in one decode
pass. A prompt longer than `prefill_chunk` tokens that arrives while replies are decoding is
prefilled alone, one chunk per step, into a reserved slot, so the running rows go on decoding
between its chunks instead of waiting for the whole prompt (with nothing decoding, every prompt is
prefilled whole, together). Slots grow as requests arrive (up to `max_rows`) and are dropped when half or more have stood
empty for a few steps.

Tokens are reported as they are fed: a `TokenEvent` carries the token, the text it adds (text that
may begin a stop text is held back until later tokens settle it, so a stream never shows part of a
stop text; the `EndEvent` has the whole reply) and the watched projection at its own position (the
activation computed when it is fed), so a reply's projections line up one to one with its tokens.
The KV layout is batching.py's.

Thread use: one thread runs `run_forever` (or calls `step`); `submit` and `Request.cancel` may be
called from any thread. Events are delivered by calling the request's `on_event` in the engine thread.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from persona_axis.batching import SlotColumns, slot_cache, supports_slots
from persona_axis.decoding import left_padded, preallocated_cache, stop_token_ids
from persona_axis.errors import PersonaAxisError
from persona_axis.hooks import layer_hooks
from persona_axis.models import LoadedModel
from persona_axis.row_interventions import RowInterventions, RowSettings
from persona_axis.sampling import pick_tokens, reply_generator, stream_seed


@dataclass(frozen=True)
class Sampling:
    """How one request picks tokens: greedy when temperature <= 0, else nucleus sampling from its own
    stream (seeded like reply 0 of an offline `generate(..., seed=seed)`). ignore_eos: run to max_new_tokens."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_texts: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as it is fed: its id, the text it adds, its watched projection (None without
    watch) and the layers whose cap raised it."""

    token_id: int
    text: str
    projection: float | None
    capped_layers: tuple[int, ...]


@dataclass(frozen=True)
class EndEvent:
    """A request's end. reason: "stop" (end of turn or a stop text), "length" (max_new_tokens),
    "cancelled" or "error" (then `error` says why). engaged: {layer: share of its tokens the cap raised}."""

    reason: str
    text: str
    token_ids: list[int]
    projections: list[float]
    engaged: dict[int, float]
    prompt_tokens: int
    error: str = ""


Event = TokenEvent | EndEvent
SHRINK_AFTER_STEPS = 8  # empty slots are dropped after this many sparse steps (not at once: a client may be back)
PREFILL_CHUNK = 256  # prompt tokens prefilled per step for a long prompt (the others wait at most this much per step)


class QueueFull(PersonaAxisError):
    """The engine's waiting queue is full: try again later."""


@dataclass
class Request:
    """A submitted request; `cancel()` frees its row (or its place in the queue) at the next step."""

    prompt_ids: list[int]
    sampling: Sampling
    settings: RowSettings
    on_event: Callable[[Event], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def end_before_reply(self, reason: str, error: str = "") -> None:
        """Deliver the end of a request that never got a row (no text, no tokens)."""
        self.on_event(EndEvent(reason, "", [], [], {}, len(self.prompt_ids), error))


@dataclass
class _Row:
    """A running request: the tokens picked so far (the last one pending, i.e. not yet fed)."""

    request: Request
    tokens: list[int]
    generator: torch.Generator | None
    text: str = ""
    reported: int = 0  # tokens fed and reported so far
    cut_text: str | None = None  # the reply's text when a stop text ended it
    projections: list[float] = field(default_factory=list)
    raised: dict[int, int] = field(default_factory=dict)


@dataclass
class _Prefill:
    """A long prompt being prefilled chunk by chunk into its own cache, for the reserved `slot`."""

    request: Request
    slot: int
    cache: Any
    done: int = 0  # prompt tokens fed so far


class Engine:
    """Continuous batching over requests that arrive at any time (see the module doc).

    max_rows: most requests decoded together; max_waiting: most requests queued for a row
    (`submit` raises QueueFull beyond it); prefill_chunk: prompts longer than this are prefilled
    this many tokens per step.
    """

    def __init__(self, lm: LoadedModel, max_rows: int = 16, max_waiting: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if not supports_slots(lm.model):
            raise PersonaAxisError(f"{lm.name} has cache layers other than full attention (e.g. sliding windows): "
                                   "serving needs a model whose every layer attends to the whole context")
        if max_rows < 1 or prefill_chunk < 1:
            raise PersonaAxisError(f"the engine needs at least one row and a prefill chunk of at least one token, got "
                                   f"{max_rows} rows and {prefill_chunk} tokens")
        self.lm, self.max_rows, self.max_waiting, self.prefill_chunk = lm, max_rows, max_waiting, prefill_chunk
        self.stops = frozenset(stop_token_ids(lm))
        self.pad = int(lm.tokenizer.pad_token_id)
        device = lm.device
        self.columns = SlotColumns(torch.zeros(0, dtype=torch.long, device=device), torch.arange(0, device=device))
        self.cache, self.layers = slot_cache(lm.model, self.columns)
        self.interventions = RowInterventions(0, lm.hidden_size, device)
        self.rows: list[_Row | None] = []
        self.lengths: list[int] = []
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.ended: Counter[str] = Counter()  # requests ended so far, by reason
        self.entering: list[Request] = []  # taken from the queue, not yet in a row
        self.prefilling: _Prefill | None = None  # the long prompt being prefilled, if any
        self.sparse_steps = 0  # consecutive steps with half the slots or more empty and nobody waiting

    # -- requests -------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, settings: RowSettings,
               on_event: Callable[[Event], None]) -> Request:
        """Queue a request; raises QueueFull when `max_waiting` requests already wait."""
        if not prompt_ids or sampling.max_new_tokens < 1:
            raise PersonaAxisError("a request needs a non-empty prompt and max_new_tokens >= 1")
        request = Request(list(prompt_ids), sampling, settings, on_event)
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a row: try again shortly")
            self.waiting.append(request)
            self.wake.notify()
        return request

    @property
    def busy(self) -> int:
        return sum(row is not None for row in self.rows)

    def run_forever(self) -> None:
        """Step until `close()`, then end what is running or being prefilled as cancelled; sleeps while there
        is nothing to do."""
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not self.busy and self.prefilling is None:
                    self.wake.wait()
                if self.closed:
                    break
            self.step()
        if self.prefilling is not None:
            self.prefilling.request.cancel()
        for row in self.rows:
            if row is not None:
                row.request.cancel()
        with torch.inference_mode():  # the row tables were made in inference mode
            self._drop_cancelled()

    def close(self) -> None:
        """Stop `run_forever`; waiting requests end as cancelled here, running ones in the engine thread."""
        with self.wake:
            self.closed = True
            self.wake.notify_all()
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.end_before_reply("cancelled")

    # -- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots, one chunk of a long prompt, then one decode step for every running row."""
        try:
            self._drop_cancelled()
            self._admit()
            if self.prefilling is not None:
                self._prefill_chunk()
            if self.busy:
                self._decode()
            sparse = 2 * self.busy <= len(self.rows) and not self.waiting and self.prefilling is None
            self.sparse_steps = self.sparse_steps + 1 if sparse else 0
            if self.rows and self.sparse_steps >= SHRINK_AFTER_STEPS:
                self._shrink()
        except Exception as exc:  # a failed step must not leave clients waiting forever
            self._fail_all(f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        with self.wake:
            cancelled = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in cancelled:
            request.end_before_reply("cancelled")
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._end(slot, "cancelled")
        if self.prefilling is not None and self.prefilling.request.cancelled:
            request = self._drop_prefill()
            self.entering.remove(request)
            request.end_before_reply("cancelled")

    def _drop_prefill(self) -> Request:
        """Give up the long prompt being prefilled (its reserved slot is free again); returns its request."""
        assert self.prefilling is not None
        request, slot = self.prefilling.request, self.prefilling.slot
        self.prefilling = None
        self.interventions.clear_row(slot)
        return request

    def _admit(self) -> None:
        """Take waiting requests in order while rows are free, into one prefill pass now. While replies are
        decoding (or a long prompt is being prefilled), a long prompt would stall them: the first one waiting
        gets a reserved slot and is prefilled chunk by chunk instead, the other long ones wait, and short
        ones behind them go ahead."""
        reserved = self.prefilling.slot if self.prefilling is not None else -1
        chunking = self.busy > 0 or self.prefilling is not None
        with self.wake:
            free = [s for s, row in enumerate(self.rows) if row is None and s != reserved]
            room = len(free) + self.max_rows - len(self.rows)
            entering: list[Request] = []
            long: Request | None = None
            waiting: deque[Request] = deque()
            while self.waiting and len(entering) + (long is not None) < room:
                request = self.waiting.popleft()
                if not chunking or len(request.prompt_ids) <= self.prefill_chunk:
                    entering.append(request)
                elif long is None and self.prefilling is None:
                    long = request
                else:
                    waiting.append(request)
            self.waiting = waiting + self.waiting
        taken = entering + ([long] if long is not None else [])
        self.entering += taken
        if not taken:
            return
        if len(free) < len(taken):
            free += self._grow_slots(len(taken) - len(free))
        self._ensure_capacity(max(len(r.prompt_ids) + r.sampling.max_new_tokens + 1 for r in taken))
        if long is not None:
            slot = free.pop()
            self.interventions.set_row(slot, long.settings)
            self.prefilling = _Prefill(long, slot, preallocated_cache(self.lm.model, len(long.prompt_ids)))
        if not entering:
            return
        slots = free[: len(entering)]
        for slot, request in zip(slots, entering):
            self.interventions.set_row(slot, request.settings)
        logits = self._prefill(slots, entering)
        for k, (slot, request) in enumerate(zip(slots, entering)):
            self._enter(slot, request, logits[k : k + 1])

    def _enter(self, slot: int, request: Request, logits: Tensor) -> None:
        """A prefilled request takes its row and picks its first token from `logits` [1, vocab]."""
        seed = stream_seed(request.sampling.seed, 0)
        generator = reply_generator(seed, self.lm.device) if request.sampling.temperature > 0 else None
        self.rows[slot] = _Row(request, [], generator)
        self.entering.remove(request)
        self.lengths[slot] = len(request.prompt_ids)
        self._take(slot, self._pick(logits, [slot])[0])

    def _prefill_chunk(self) -> None:
        """Feed the long prompt's next `prefill_chunk` tokens (its own interventions on); at its end, copy its
        keys/values into the reserved slot and let it enter its row."""
        assert self.prefilling is not None
        job, device = self.prefilling, self.lm.device
        prompt = job.request.prompt_ids
        end = min(job.done + self.prefill_chunk, len(prompt))
        ops = self.interventions.for_rows(torch.tensor([job.slot], device=device), counting=False,
                                          prompt_ends=end == len(prompt))
        with layer_hooks(self.lm.layers, ops):
            out = self.lm.model(input_ids=torch.tensor([prompt[job.done:end]], device=device),
                                position_ids=torch.arange(job.done, end, device=device)[None, :],
                                past_key_values=job.cache, use_cache=True, logits_to_keep=1)
        job.done = end
        if end < len(prompt):
            return
        for layer, source in zip(self.layers, job.cache.layers):
            layer.load(job.slot, source.keys[0], source.values[0])
        self.prefilling = None
        self._enter(job.slot, job.request, out.logits[:, -1])

    def _grow_slots(self, extra: int) -> list[int]:
        start = len(self.rows)
        slots = start + extra
        for layer in self.layers:
            layer.resize(slots, self.columns.capacity)
        self.interventions.resize(slots)
        self.rows += [None] * extra
        self.lengths += [0] * extra
        self.columns.rows = torch.arange(slots, device=self.lm.device)
        return list(range(start, slots))

    def _ensure_capacity(self, needed: int) -> None:
        if needed > self.columns.capacity:
            capacity = max(needed, 2 * self.columns.capacity)
            for layer in self.layers:
                layer.resize(len(self.rows), capacity)
            self.columns.capacity = capacity

    def _prefill(self, slots: list[int], entering: list[Request]) -> Tensor:
        """Run the entering prompts with their own interventions; copy their keys/values into `slots`.
        Returns the logits at each prompt's last position [entering, vocab]."""
        prompts = [r.prompt_ids for r in entering]
        ids, attention, positions = left_padded(prompts, self.pad, self.lm.device)
        prefill = preallocated_cache(self.lm.model, ids.shape[1])
        ops = self.interventions.for_rows(torch.tensor(slots, device=self.lm.device), counting=False)
        with layer_hooks(self.lm.layers, ops):
            out = self.lm.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                past_key_values=prefill, use_cache=True, logits_to_keep=1)
        filled = prefill
        for layer, source in zip(self.layers, filled.layers):  # type: ignore[attr-defined]
            for row, (slot, prompt) in enumerate(zip(slots, prompts)):
                layer.load(slot, source.keys[row, :, -len(prompt):], source.values[row, :, -len(prompt):])
        return out.logits[:, -1]

    def _pick(self, logits: Tensor, slots: list[int]) -> list[int]:
        """Each slot's next token from its row of logits [len(slots), vocab], with that request's sampling."""
        picked = []
        for k, slot in enumerate(slots):
            row = self.rows[slot]
            assert row is not None
            s = row.request.sampling
            generators = [row.generator] if row.generator is not None else []
            picked.append(int(pick_tokens(logits[k : k + 1], s.temperature, s.top_p, generators)[0]))
        return picked

    def _take(self, slot: int, token: int) -> None:
        """A picked token: an end-of-turn ends the row; a stop text ends it before the token; else it is pending."""
        row = self.rows[slot]
        assert row is not None
        s = row.request.sampling
        if token in self.stops and not s.ignore_eos:
            self._end(slot, "stop")
            return
        if s.stop_texts:
            text = self.lm.tokenizer.decode(row.tokens + [token], skip_special_tokens=True)
            cut = min((text.find(t) for t in s.stop_texts if t in text), default=-1)
            if cut >= 0:
                row.cut_text = text[:cut]
                self._end(slot, "stop")
                return
        row.tokens.append(token)

    def _decode(self) -> None:
        """Feed every running row its pending token; report it; end rows at their length; pick the next tokens."""
        device = self.lm.device
        occupied = [s for s, row in enumerate(self.rows) if row is not None]
        pending = [row.tokens[-1] if row is not None else self.pad for row in self.rows]
        lengths = torch.tensor(self.lengths, device=device)
        self.columns.lengths, self.columns.width = lengths, max(self.lengths) + 1
        attention = torch.arange(self.columns.width, device=device)[None, :] <= lengths[:, None]
        ops = self.interventions.for_rows(None, counting=True)
        with layer_hooks(self.lm.layers, ops):
            out = self.lm.model(input_ids=torch.tensor(pending, device=device)[:, None], attention_mask=attention,
                                position_ids=lengths[:, None], past_key_values=self.cache, use_cache=True,
                                logits_to_keep=1)
        projections = self.interventions.projections.tolist()
        raised = {layer: flags.tolist() for layer, flags in self.interventions.raised.items()}
        picking = []
        for s in occupied:
            self.lengths[s] += 1
            self._report(s, projections[s], [layer for layer, flags in sorted(raised.items()) if flags[s]])
            row = self.rows[s]
            assert row is not None
            if len(row.tokens) >= row.request.sampling.max_new_tokens:
                self._end(s, "length")
            else:
                picking.append(s)
        if picking:
            for s, token in zip(picking, self._pick(out.logits[picking, -1], picking)):
                self._take(s, token)

    def _report(self, slot: int, projection: float, capped_layers: list[int]) -> None:
        row = self.rows[slot]
        assert row is not None
        text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True)
        shown = text[: len(text) - stop_prefix_length(text, row.request.sampling.stop_texts)]
        delta = shown[len(row.text):] if not shown.endswith("\ufffd") else ""  # hold back half a character
        row.text += delta
        row.reported += 1
        watched = row.request.settings.watch is not None
        if watched:
            row.projections.append(projection)
        for layer in row.request.settings.engaged_layers:
            row.raised[layer] = row.raised.get(layer, 0) + (layer in capped_layers)
        row.request.on_event(TokenEvent(row.tokens[-1], delta, projection if watched else None, tuple(capped_layers)))

    def _end(self, slot: int, reason: str, error: str = "") -> None:
        row = self.rows[slot]
        assert row is not None
        self.rows[slot] = None
        self.lengths[slot] = 0
        self.interventions.clear_row(slot)
        fed = row.tokens[: row.reported]
        text = row.cut_text if row.cut_text is not None else self.lm.tokenizer.decode(fed, skip_special_tokens=True)
        engaged = {layer: row.raised.get(layer, 0) / max(1, row.reported) for layer in row.request.settings.engaged_layers}
        self.ended[reason] += 1
        row.request.on_event(EndEvent(reason, text, fed, row.projections, engaged,
                                      len(row.request.prompt_ids), error))

    def _shrink(self) -> None:
        keep = [s for s, row in enumerate(self.rows) if row is not None]
        slots = torch.tensor(keep, dtype=torch.long, device=self.lm.device)
        for layer in self.layers:
            layer.keep(slots)
        self.interventions.keep(slots)
        self.rows, self.lengths = [self.rows[s] for s in keep], [self.lengths[s] for s in keep]
        self.columns.rows = torch.arange(len(keep), device=self.lm.device)

    def _fail_all(self, why: str) -> None:
        for request in self.entering:  # the long prompt being prefilled among them
            request.end_before_reply("error", why)
        self.entering = []
        if self.prefilling is not None:
            self._drop_prefill()
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._end(slot, "error", why)


def stop_prefix_length(text: str, stop_texts: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `stop_texts`: characters a stream holds back,
    since the next tokens may complete the stop text (which is never part of a reply)."""
    for k in range(min(len(text), max((len(t) for t in stop_texts), default=1) - 1), 0, -1):
        if any(t.startswith(text[-k:]) for t in stop_texts):
            return k
    return 0


def run_to_end(engine: Engine, jobs: Sequence[tuple[Sequence[int], Sampling, RowSettings]]) -> list[EndEvent]:
    """Submit every job, step the engine in this thread until all have ended; the end events in job order."""
    ends: list[EndEvent | None] = [None] * len(jobs)

    def recorder(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, EndEvent):
                ends[i] = event
        return on_event

    for i, (prompt, sampling, settings) in enumerate(jobs):
        engine.submit(prompt, sampling, settings, recorder(i))
    while any(e is None for e in ends):
        engine.step()
    return [e for e in ends if e is not None]
