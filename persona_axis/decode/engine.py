"""The decode engine: continuous batching over requests that join while others decode and leave when done.

Every decode in the package runs here: offline lists (`generate`, the pipeline's rollouts, evals,
simulations, calibration) submit their whole list at once, the server and `chat` submit requests as
they come. Each request has its own sampling settings, interventions and watched layer
(row_interventions.RowSettings) and may ask for its reply's per-layer mean activations.

One `step` is schedule -> forward -> update:
- schedule: drop cancelled requests; admit waiting ones into free slots (growing the slots up to
  `max_rows`); a prompt longer than `prefill_chunk` that arrives while replies are decoding gets a
  reserved slot and is prefilled one chunk per step, so the running rows go on decoding between its
  chunks; once half the slots or more stand empty with nobody waiting (for `shrink_patience` steps),
  drop the empty ones;
- forward (runner.ModelRunner): one prefill pass for the admitted prompts (shared beginnings once),
  then one decode pass feeding every running row its pending token;
- update: each row reports the token it fed, ends at its length, or picks its next token with its
  own sampling; an end-of-turn token or a stop text ends it.

Tokens are reported as they are fed: a `TokenEvent` carries the token, the text it adds (text that
may begin a stop text is held back until later tokens settle it, so a stream never shows part of a
stop text; the `EndEvent` has the whole reply) and the watched projection at its own position (the
activation computed when it is fed), so a reply's projections line up one to one with its tokens.
A reply cut by max_new_tokens feeds its last token too when something reads that token's activations
(capture, watch or cap engagement); otherwise the last token is reported without a pass.
The KV layout is decode/kv.py's.

Thread use: one thread runs `run_forever` (or calls `step`); `submit` and `Request.cancel` may be
called from any thread. Events are delivered by calling the request's `on_event` in the engine thread.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from persona_axis.decode.common import stop_token_ids
from persona_axis.decode.interventions import layer_lists
from persona_axis.decode.kv import supports_slots
from persona_axis.decode.prefix_cache import PrefixCache
from persona_axis.decode.requests import (
    EndEvent,
    Event,
    Prefill,
    QueueFull,
    Request,
    Row,
    Sampling,
    TokenEvent,
    stop_prefix_length,
)
from persona_axis.decode.row_interventions import RowSettings
from persona_axis.decode.runner import ModelRunner
from persona_axis.decode.sampling import pick_tokens, reply_generator
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

SHRINK_AFTER_STEPS = 8  # serving drops empty slots after this many sparse steps (not at once: a client may be back)
PREFILL_CHUNK = 256  # prompt tokens prefilled per step for a long prompt (the others wait at most this much per step)


class Engine:
    """Continuous batching over requests that arrive at any time (see the module doc).

    max_rows: most requests decoded together; max_waiting: most requests queued for a row (`submit`
    raises QueueFull beyond it); prefill_chunk: prompts longer than this are prefilled this many tokens
    per step while others decode. capture_layers: the layers whose reply means capturing requests
    record. share_prefixes: prefill a prompt beginning shared by several prompts once. shrink_patience:
    sparse steps before empty slots are dropped. keep_conversations: a finished reply's prompt and reply
    keys/values stay as a prefix for the conversation's next turn (serving). Offline lists leave it off:
    keys/values computed while decoding differ in float rounding from a prefill of the same tokens, so a
    resumed simulation would no longer equal an uninterrupted one.
    """

    def __init__(self, lm: LoadedModel, max_rows: int = 16, max_waiting: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, *, capture_layers: Sequence[int] = (),
                 share_prefixes: bool = True, shrink_patience: int = SHRINK_AFTER_STEPS,
                 keep_conversations: bool = True) -> None:
        if not supports_slots(lm.model):
            raise PersonaAxisError(f"{lm.name} has cache layers other than full attention (e.g. sliding windows): "
                                   "the engine needs a model whose every layer attends to the whole context")
        if max_rows < 1 or prefill_chunk < 1:
            raise PersonaAxisError(f"the engine needs at least one row and a prefill chunk of at least one token, got "
                                   f"{max_rows} rows and {prefill_chunk} tokens")
        self.lm, self.max_rows, self.max_waiting, self.prefill_chunk = lm, max_rows, max_waiting, prefill_chunk
        self.shrink_patience, self.keep_conversations = shrink_patience, keep_conversations
        self.stops = frozenset(stop_token_ids(lm))
        self.pad = int(lm.tokenizer.pad_token_id)
        self.runner = ModelRunner(lm, capture_layers, PrefixCache() if share_prefixes else None)
        self.rows: list[Row | None] = []
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.ended: Counter[str] = Counter()  # requests ended so far, by reason
        self.entering: list[Request] = []  # taken from the queue, not yet in a row
        self.prefilling: Prefill | None = None  # the long prompt being prefilled, if any
        self.sparse_steps = 0  # consecutive steps with half the slots or more empty and nobody waiting
        self.failure: Exception | None = None  # what made the last failed step fail

    # -- requests -------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, settings: RowSettings,
               on_event: Callable[[Event], None], capture: bool = False) -> Request:
        """Queue a request; raises QueueFull when `max_waiting` requests already wait."""
        if not prompt_ids or sampling.max_new_tokens < 1:
            raise PersonaAxisError("a request needs a non-empty prompt and max_new_tokens >= 1")
        request = Request(list(prompt_ids), sampling, settings, on_event, capture and self.runner.means is not None)
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

    # -- one step: schedule -> forward -> update ----------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots, one chunk of a long prompt, then one decode step for every running row."""
        try:
            self._drop_cancelled()
            self._admit()
            if self.prefilling is not None:
                self._prefill_chunk()
            sparse = 2 * self.busy <= len(self.rows) and not self.waiting and self.prefilling is None
            self.sparse_steps = self.sparse_steps + 1 if sparse else 0
            if self.rows and self.sparse_steps >= self.shrink_patience:
                self._shrink()
            if self.busy:
                self._decode()
        except Exception as exc:  # a failed step must not leave clients waiting forever
            self.failure = exc
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
        self.runner.release(slot)
        return request

    def _admit(self) -> None:
        """Admit waiting requests while rows are free; again when a reply ended at its first token."""
        while self._admit_once() and self.waiting:
            pass

    def _admit_once(self) -> bool:
        """Take waiting requests in order while rows are free, into one prefill pass now. While replies are
        decoding (or a long prompt is being prefilled), a long prompt would stall them: the first one waiting
        gets a reserved slot and is prefilled chunk by chunk instead, the other long ones wait, and short
        ones behind them go ahead. Returns whether a reply admitted now already ended (freeing its row)."""
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
            return False
        if len(free) < len(taken):
            free += self._grow_slots(len(taken) - len(free))
        self.runner.ensure_capacity(max(len(r.prompt_ids) + r.sampling.max_new_tokens + 1 for r in taken))
        if long is not None:
            slot = free.pop()
            self.runner.assign(slot, long.settings)
            self.prefilling = Prefill(long, slot, self.runner.chunk_cache(len(long.prompt_ids)))
        if not entering:
            return False
        slots = free[: len(entering)]
        for slot, request in zip(slots, entering):
            self.runner.assign(slot, request.settings)
        logits = self.runner.prefill(slots, [r.prompt_ids for r in entering],
                                     [r.settings.prefix_key for r in entering])
        self._enter(slots, entering, logits)
        return any(self.rows[slot] is None for slot in slots)

    def _enter(self, slots: list[int], requests: list[Request], logits: Tensor) -> None:
        """Prefilled requests take their rows and pick their first tokens from `logits` [len(slots), vocab]."""
        for slot, request in zip(slots, requests):
            s = request.sampling
            generator = reply_generator(s.stream_seed, self.lm.device) if s.temperature > 0 else None
            self.rows[slot] = Row(request, [], generator)
            self.entering.remove(request)
        for slot, token in zip(slots, self._pick(logits, slots)):
            self._take(slot, token)

    def _prefill_chunk(self) -> None:
        """Feed the long prompt's next `prefill_chunk` tokens (its own interventions on); at its end, it enters its
        reserved row."""
        assert self.prefilling is not None
        job = self.prefilling
        prompt = job.request.prompt_ids
        end = min(job.done + self.prefill_chunk, len(prompt))
        logits = self.runner.prefill_chunk(job.slot, job.cache, prompt, job.done, end)
        job.done = end
        if logits is not None:
            self.prefilling = None
            self._enter([job.slot], [job.request], logits)

    def _grow_slots(self, extra: int) -> list[int]:
        self.rows += [None] * extra
        return self.runner.grow(extra)

    def _pick(self, logits: Tensor, slots: list[int]) -> list[int]:
        """Each slot's next token from its row of logits [len(slots), vocab], with that request's sampling
        (rows that sample alike are picked together)."""
        picked = [0] * len(slots)
        alike: dict[tuple[float, float], list[int]] = {}
        for k, slot in enumerate(slots):
            row = self.rows[slot]
            assert row is not None
            alike.setdefault((row.request.sampling.temperature, row.request.sampling.top_p), []).append(k)
        for (temperature, top_p), ks in alike.items():
            rows = [self.rows[slots[k]] for k in ks]
            generators = [row.generator for row in rows if row is not None and row.generator is not None]
            for k, token in zip(ks, pick_tokens(logits[ks], temperature, top_p, generators).tolist()):
                picked[k] = int(token)
        return picked

    def _take(self, slot: int, token: int) -> None:
        """A picked token: an end-of-turn ends the row; a stop text ends it before the token; else it is pending
        (and when it is the reply's last and nothing reads its activations, reported at once: the row ends)."""
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
        if len(row.tokens) >= s.max_new_tokens and not row.request.reads_activations:
            self._report(slot, None, [])
            self._end(slot, "length")

    def _decode(self) -> None:
        """Feed every running row its pending token; report it; end rows at their length; pick the next tokens."""
        rows = self.rows
        occupied = [s for s, row in enumerate(rows) if row is not None]
        pending = [row.tokens[-1] if row is not None else self.pad for row in rows]
        picking = [s for s in occupied if len(rows[s].tokens) < rows[s].request.sampling.max_new_tokens]  # type: ignore[union-attr]
        logits, projections, raised = self.runner.decode(
            pending, [row is not None for row in rows], [row is not None and row.request.capture for row in rows],
            need_logits=bool(picking))
        for s in occupied:
            self._report(s, projections[s], [layer for layer, flags in sorted(raised.items()) if flags[s]])
            if s not in picking:
                self._end(s, "length")
        if picking:
            assert logits is not None
            for s, token in zip(picking, self._pick(logits[picking], picking)):
                self._take(s, token)

    def _report(self, slot: int, projection: float | None, capped_layers: list[int]) -> None:
        """The row's pending token was fed (or, at a reply's end, needs no pass): deliver it with the text it adds."""
        row = self.rows[slot]
        assert row is not None
        text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True)
        shown = text[: len(text) - stop_prefix_length(text, row.request.sampling.stop_texts)]
        delta = shown[len(row.text):] if not shown.endswith("\ufffd") else ""  # hold back half a character
        row.text += delta
        row.reported += 1
        watched = row.active.watch is not None and projection is not None
        if watched:
            assert projection is not None
            row.projections.append(projection)
        for layer in row.active.engaged_layers:
            row.raised[layer] = row.raised.get(layer, 0) + (layer in capped_layers)
        fired = watched and self._check_guard(slot, row)
        row.request.on_event(TokenEvent(row.tokens[-1], delta, projection if watched else None, tuple(capped_layers),
                                        fired))

    def _check_guard(self, slot: int, row: Row) -> bool:
        """Fire the row's guard when the running mean of its projections has fallen below the threshold: its
        interventions act from the next token on. Returns whether it fired on this token."""
        guard = row.active.guard
        if guard is None or len(row.projections) < guard.min_tokens:
            return False
        if sum(row.projections) / len(row.projections) >= guard.threshold:
            return False
        row.settings, row.guard_fired_at = row.active.guarded(), row.reported - 1
        self.runner.assign(slot, row.active)
        return True

    def _end(self, slot: int, reason: str, error: str = "") -> None:
        row = self.rows[slot]
        assert row is not None
        request, active = row.request, row.active
        self.rows[slot] = None
        fed = row.tokens[: row.reported]
        if self.keep_conversations and reason in ("stop", "length") and row.guard_fired_at is None \
                and active.acts_only_at_all_positions:
            held = self.runner.lengths[slot]  # columns with keys/values: the prompt and the tokens fed
            self.runner.remember(slot, (request.prompt_ids + fed)[:held], active.prefix_key)
        means = self.runner.release(slot)
        if not request.capture:
            means = None
        text = row.cut_text if row.cut_text is not None else self.lm.tokenizer.decode(fed, skip_special_tokens=True)
        seen = row.reported - (row.guard_fired_at + 1 if row.guard_fired_at is not None else 0)
        engaged = {layer: row.raised.get(layer, 0) / max(1, seen) for layer in active.engaged_layers}
        interventions = layer_lists(active.interventions)
        for layer in active.engaged_layers:
            for item in interventions[layer]:
                item.count(row.raised.get(layer, 0), seen)
        self.ended[reason] += 1
        request.on_event(EndEvent(reason, text, fed, row.projections, engaged, len(request.prompt_ids), error, means,
                                  row.guard_fired_at))

    def _shrink(self) -> None:
        keep = [s for s, row in enumerate(self.rows) if row is not None]
        self.runner.keep(keep)
        self.rows = [self.rows[s] for s in keep]
        self.sparse_steps = 0

    def _fail_all(self, why: str) -> None:
        for request in self.entering:  # the long prompt being prefilled among them
            request.end_before_reply("error", why)
        self.entering = []
        if self.prefilling is not None:
            self._drop_prefill()
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._end(slot, "error", why)


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
