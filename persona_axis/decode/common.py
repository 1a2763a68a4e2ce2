"""What the engine and the static loop share: the settings of a call, a finished reply, the cache.

Which tokens count as a reply's and how their activations are read is stated in decode/generate.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from persona_axis.decode.capture import StepMeanRecorder, StepProjectionRecorder
from persona_axis.decode.interventions import Cap, Intervention
from persona_axis.decode.row_interventions import Guard
from persona_axis.model.loading import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Called for every reply token as it is fed, with (conversation index, token id, its projection on the watched
# direction), in each conversation's token order.
TokenCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class DecodeSpec:
    """What one generate call asks of a decode loop (validated by generate.generate).

    layers: layers whose response means are captured ([] for none). interventions: {layer: its
    interventions, in the order they act}, checked against the model. watch: (layer, direction
    [hidden]) for per-token projections. stops: the end-of-turn ids (empty: every reply runs to
    max_new_tokens). share_prefixes: the engine prefills a prompt beginning shared by several prompts
    once (decode/prefix_cache.py). guard: interventions held back until the watched projection's running mean
    falls below its threshold (decode/row_interventions.Guard; engine only).
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    layers: list[int]
    interventions: dict[int, list[Intervention]]
    watch: tuple[int, Tensor] | None
    on_token: TokenCallback | None
    stops: frozenset[int]
    share_prefixes: bool = True
    guard: Guard | None = None

    @property
    def caps(self) -> tuple[Cap, ...]:
        """The tracking caps among the interventions (the static loop tells them which rows hold a reply token)."""
        return tuple(item for items in self.interventions.values() for item in items
                     if isinstance(item, Cap) and item.track)

    @property
    def records(self) -> bool:
        """Whether the loop reads activations of reply tokens (so a cut reply's last token is fed once more)."""
        return bool(self.layers) or self.watch is not None

    def recorders(self, lm: LoadedModel, rows: int) -> tuple[StepMeanRecorder | None, StepProjectionRecorder | None]:
        """Fresh mean and projection recorders for `rows` batch rows (None where not asked for)."""
        means = StepMeanRecorder(self.layers, rows, lm.hidden_size, lm.device) if self.layers else None
        watcher = StepProjectionRecorder(self.watch[0], self.watch[1], rows, lm.device) if self.watch else None
        return means, watcher


@dataclass
class Reply:
    """One generated reply. means: [len(layers), hidden] float32 on the CPU (None without capture);
    projections: per-token projections on the watched direction (None without watch); guard_fired_at: the reply
    token (0-based) on which its guard fired, or None."""

    text: str
    token_ids: list[int]
    finished: bool
    means: Tensor | None
    projections: list[float] | None
    guard_fired_at: int | None = None

    def captured_means(self) -> Tensor:
        """`means` [layers, hidden]; raises ValueError when the reply was generated without capture."""
        if self.means is None:
            raise ValueError("this reply was generated without capture: pass capture=True or a list of layers")
        return self.means


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """End-of-turn ids: the generation config's eos ids plus the tokenizer's eos id."""
    ids: set[int] = set()
    configured = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return sorted(ids)


def left_padded(prompt_ids: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(input ids, attention mask, position ids), each [n, longest prompt], for prompts padded on the left."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    return ids, attention, (attention.cumsum(-1) - 1).clamp_min(0)


@contextmanager
def counting_rows(caps: Sequence[Cap], rows: Tensor) -> Iterator[None]:
    """Within the block, tracking caps count engagement only on the rows where `rows` [batch] is true."""
    for cap in caps:
        cap.count_rows(rows)
    try:
        yield
    finally:
        for cap in caps:
            cap.count_rows(None)


def preallocated_cache(model: PreTrainedModel, capacity: int) -> object:
    """A DynamicCache whose full-attention layers write into buffers of `capacity` positions.

    The stock layer concatenates its whole history at every step (copying that grows with the
    length; the largest cost after matrix products in a profile of the embedded model); this one
    writes the new keys/values in place and returns views. Models with sliding-window or other
    layer kinds keep the stock cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            shape = lambda t: (t.shape[0], t.shape[1], capacity, t.shape[3])  # noqa: E731
            self._key_buffer = key_states.new_empty(shape(key_states))
            self._value_buffer = value_states.new_empty(shape(value_states))
            self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]

        def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2] if self.keys is not None else 0
            end = start + key_states.shape[-2]
            self._key_buffer[:, :, start:end].copy_(key_states)
            self._value_buffer[:, :, start:end].copy_(value_states)
            self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
            return self.keys, self.values

    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer() for _ in cache.layers]
    return cache
