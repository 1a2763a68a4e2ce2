"""The engine's KV layout: a set of slots, each holding one reply in progress.

KV layout: every cache layer holds buffers [slots, kv_heads, capacity, head_dim]. Slot s keeps its
conversation's keys and values in columns [0, length_s): the prompt's, copied from a prefill pass
of the newly admitted conversations, then one column per fed token. A decode step feeds every slot
its pending token at position length_s, writes that token's key and value at column length_s,
and attends over the first max(length) + 1 columns with a mask that hides each slot's columns
past its own (stale entries of an earlier occupant included). Positions equal columns, so a
refilled slot needs no reset. Slots grow, and empty ones are dropped, as the engine decides
(decode/engine.py); the runner (decode/runner.py) does the passes.

Models whose cache holds other layer kinds than plain full attention (sliding windows, ...) are
not supported here: `supports_slots` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def supports_slots(model: PreTrainedModel) -> bool:
    """True when every cache layer of the model is a plain full-attention layer (what slots replace)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class SlotColumns:
    """Where a decode step writes: column lengths[s] for slot s; `width` columns are attended over."""

    lengths: Tensor  # [slots] long
    rows: Tensor  # [slots] long: 0..slots-1
    width: int = 1
    capacity: int = 0  # columns each slot's buffers hold


def slot_cache(model: PreTrainedModel, columns: SlotColumns) -> tuple[Any, list[Any]]:
    """A transformers cache whose layers write each slot's new key/value at that slot's own column."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def load(self, slot: int, keys: Tensor, values: Tensor) -> None:
            """Put a prompt's keys/values [kv_heads, length, head_dim] in columns [0, length) of `slot`."""
            if not self.is_initialized:
                shape = (columns.rows.shape[0], keys.shape[0], columns.capacity)
                self.key_buffer = keys.new_zeros(*shape, keys.shape[2])
                self.value_buffer = values.new_zeros(*shape, values.shape[2])
                self.keys, self.values, self.is_initialized = self.key_buffer, self.value_buffer, True
            self.key_buffer[slot, :, : keys.shape[1]] = keys
            self.value_buffer[slot, :, : values.shape[1]] = values

        def keep(self, slots: Tensor) -> None:
            """Keep only the slots listed in `slots` [k] long, in that order."""
            if self.is_initialized:
                self.key_buffer, self.value_buffer = self.key_buffer[slots], self.value_buffer[slots]
                self.keys, self.values = self.key_buffer, self.value_buffer

        def resize(self, slots: int, capacity: int) -> None:
            """Make room for `slots` slots of `capacity` columns, keeping what the first slots hold (new room zero)."""
            if self.is_initialized:
                self.key_buffer, self.value_buffer = _resized(self.key_buffer, slots, capacity), \
                    _resized(self.value_buffer, slots, capacity)
                self.keys, self.values = self.key_buffer, self.value_buffer

        def get_seq_length(self) -> int:
            return columns.width - 1

        def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
            self.key_buffer[columns.rows, :, columns.lengths] = key_states[:, :, -1]
            self.value_buffer[columns.rows, :, columns.lengths] = value_states[:, :, -1]
            return self.key_buffer[:, :, : columns.width], self.value_buffer[:, :, : columns.width]

    cache = DynamicCache(config=model.config)
    cache.layers = [SlotLayer() for _ in cache.layers]
    return cache, cache.layers


def _resized(buffer: Tensor, slots: int, capacity: int) -> Tensor:
    """buffer [slots', heads, capacity', dim] copied into zeros [slots, heads, capacity, dim] (cut where smaller)."""
    out = buffer.new_zeros(slots, buffer.shape[1], capacity, buffer.shape[3])
    keep_slots, keep_columns = min(slots, buffer.shape[0]), min(capacity, buffer.shape[2])
    out[:keep_slots, :, :keep_columns] = buffer[:keep_slots, :, :keep_columns]
    return out
