"""What the engine serves: a request's sampling settings, the request itself, the events it receives, and the
state of a running row.

A request (`Request`) carries its prompt ids, its `Sampling`, its per-row interventions and watch
(row_interventions.RowSettings) and a callback; the engine (engine.py) calls it with a `TokenEvent`
for every token as the token is fed, then once with an `EndEvent`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from persona_axis.decode.row_interventions import RowSettings
from persona_axis.decode.sampling import stream_seed
from persona_axis.errors import PersonaAxisError


@dataclass(frozen=True)
class Sampling:
    """How one request picks tokens: greedy when temperature <= 0, else nucleus sampling from its own
    stream, seeded like reply 0 of an offline `generate(..., seed=seed)` (or with `stream` itself when
    given: an offline list gives each reply its stream). ignore_eos: run to max_new_tokens."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_texts: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: int | None = None

    @property
    def stream_seed(self) -> int:
        return self.stream if self.stream is not None else stream_seed(self.seed, 0)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as it is fed: its id, the text it adds, its watched projection (None without
    watch), the layers whose cap raised it, and whether the request's guard fired on it (its interventions
    act from the next token on)."""

    token_id: int
    text: str
    projection: float | None
    capped_layers: tuple[int, ...]
    guard_fired: bool = False


@dataclass(frozen=True)
class EndEvent:
    """A request's end. reason: "stop" (end of turn or a stop text), "length" (max_new_tokens),
    "cancelled" or "error" (then `error` says why). engaged: {layer: share of its tokens the cap raised}
    (for a guard's caps: of the tokens after it fired).
    means: the reply's per-layer mean activations [capture layers, hidden] float32 on the CPU, when the
    request asked for them."""

    reason: str
    text: str
    token_ids: list[int]
    projections: list[float]
    engaged: dict[int, float]
    prompt_tokens: int
    error: str = ""
    means: Tensor | None = None
    guard_fired_at: int | None = None  # the reply token (0-based) on which the guard fired, if it did


Event = TokenEvent | EndEvent
class QueueFull(PersonaAxisError):
    """The engine's waiting queue is full: try again later."""


@dataclass
class Request:
    """A submitted request; `cancel()` frees its row (or its place in the queue) at the next step.
    capture: record the reply's per-layer means (at the engine's capture layers)."""

    prompt_ids: list[int]
    sampling: Sampling
    settings: RowSettings
    on_event: Callable[[Event], None]
    capture: bool = False
    cancelled: bool = False

    @property
    def reads_activations(self) -> bool:
        """Whether anything reads the activations of the reply's tokens (so a cut reply's last token is fed)."""
        return (self.capture or self.settings.watch is not None or bool(self.settings.engaged_layers)
                or self.settings.guard is not None)

    def cancel(self) -> None:
        self.cancelled = True

    def end_before_reply(self, reason: str, error: str = "") -> None:
        """Deliver the end of a request that never got a row (no text, no tokens)."""
        self.on_event(EndEvent(reason, "", [], [], {}, len(self.prompt_ids), error))


@dataclass
class Row:
    """A running request: the tokens picked so far (the last one pending, i.e. not yet fed)."""

    request: Request
    tokens: list[int]
    generator: torch.Generator | None
    text: str = ""
    reported: int = 0  # tokens fed and reported so far
    cut_text: str | None = None  # the reply's text when a stop text ended it
    projections: list[float] = field(default_factory=list)
    raised: dict[int, int] = field(default_factory=dict)
    settings: RowSettings | None = None  # what acts now: the request's, or its guarded form once the guard fired
    guard_fired_at: int | None = None

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = self.request.settings

    @property
    def active(self) -> RowSettings:
        assert self.settings is not None
        return self.settings


@dataclass
class Prefill:
    """A long prompt being prefilled chunk by chunk into its own cache, for the reserved `slot`."""

    request: Request
    slot: int
    cache: Any
    done: int = 0  # prompt tokens fed so far


def stop_prefix_length(text: str, stop_texts: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `stop_texts`: characters a stream holds back,
    since the next tokens may complete the stop text (which is never part of a reply)."""
    for k in range(min(len(text), max((len(t) for t in stop_texts), default=1) - 1), 0, -1):
        if any(t.startswith(text[-k:]) for t in stop_texts):
            return k
    return 0
