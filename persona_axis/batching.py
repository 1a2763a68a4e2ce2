"""Continuous batching: a set of slots, each holding one reply in progress; a slot whose reply
ends (end-of-turn or max_new_tokens) is refilled at once with the next waiting conversation.

KV layout: every cache layer holds buffers [slots, kv_heads, capacity, head_dim]. Slot s keeps its
conversation's keys and values in columns [0, length_s): the prompt's, copied from a prefill pass
of the newly admitted conversations, then one column per fed token. A decode step feeds every slot
its pending token at position length_s, writes that token's key and value at column length_s,
and attends over the first max(length) + 1 columns with a mask that hides each slot's columns
past its own (stale entries of an earlier occupant included). Positions equal columns, so a
refilled slot needs no reset. Once no conversation waits and half the slots or more are empty,
the empty slots are dropped, so the last replies do not pay for rows that hold nothing.

Models whose cache holds other layer kinds than plain full attention (sliding windows, ...) are
not supported here: `supports_slots` says so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from persona_axis.decoding import DecodeSpec, Reply, counting_rows
from persona_axis.hooks import layer_hooks, merge_ops
from persona_axis.models import LoadedModel
from persona_axis.prefix_cache import PrefixCache, shared_prefill
from persona_axis.sampling import pick_tokens, reply_generator

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


class ContinuousBatch:
    """Generates replies for prompts through `slots` slots, refilling each as soon as its reply ends.

    Conversations enter in input order; a reply is yielded (conversation index, Reply) as soon as
    it ends. Each reply samples from its own stream seeded with seeds[i], so a reply does not
    depend on the others sharing the batch.
    """

    def __init__(self, lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
                 spec: DecodeSpec, slots: int) -> None:
        self.lm, self.prompt_ids, self.seeds, self.spec = lm, prompt_ids, seeds, spec
        n = max(1, min(slots, len(prompt_ids)))
        device = lm.device
        self.pad = int(lm.tokenizer.pad_token_id)
        capacity = max((len(p) for p in prompt_ids), default=0) + spec.max_new_tokens + 1
        self.columns = SlotColumns(torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device),
                                capacity=capacity)
        self.cache, self.layers = slot_cache(lm.model, self.columns)
        self.means, self.watcher = spec.recorders(lm, n)
        self.recorders = [r for r in (self.means, self.watcher) if r is not None]
        self.record_ops = merge_ops(*(r.ops() for r in self.recorders))
        self.waiting = deque(range(len(prompt_ids)))
        self.occupant: list[int] = [-1] * n
        self.lengths = [0] * n
        self.pending = [self.pad] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.generators: list[torch.Generator | None] = [None] * n
        self.prefixes = PrefixCache() if spec.share_prefixes else None

    @torch.inference_mode()
    def __iter__(self) -> Iterator[tuple[int, Reply]]:
        with layer_hooks(self.lm.layers, self.spec.steer_ops):
            while True:
                yield from self._admit()
                busy = sum(i >= 0 for i in self.occupant)
                if not busy:
                    return
                if not self.waiting and 2 * busy <= len(self.occupant):
                    self._shrink()
                yield from self._decode_step()

    def _admit(self) -> Iterator[tuple[int, Reply]]:
        """Fill free slots from the waiting conversations; replies that end at their first token come out at once."""
        while self.waiting and -1 in self.occupant:
            free = [s for s, i in enumerate(self.occupant) if i < 0][: len(self.waiting)]
            entering = [self.waiting.popleft() for _ in free]
            first = self._prefill(free, entering)
            for slot, index, token in zip(free, entering, first):
                self.occupant[slot], self.tokens[slot] = index, []
                ended = self._take(slot, token)
                if ended is not None:
                    yield ended

    def _prefill(self, slots: list[int], entering: list[int]) -> list[int]:
        """Run the entering prompts (interventions on; shared beginnings once), copy their keys/values into `slots`,
        pick first tokens."""
        prompts = [self.prompt_ids[i] for i in entering]
        logits, own = shared_prefill(self.lm.model, prompts, self.pad, self.lm.device, self.prefixes)
        for slot, layers in zip(slots, own):
            for layer, (keys, values) in zip(self.layers, layers):
                layer.load(slot, keys, values)
        for slot, index, prompt in zip(slots, entering, prompts):
            self.lengths[slot] = len(prompt)
            if self.spec.temperature > 0:
                self.generators[slot] = reply_generator(self.seeds[index], self.lm.device)
        return self._pick(logits, slots)

    def _pick(self, logits: Tensor, slots: list[int]) -> list[int]:
        generators = [g for g in (self.generators[s] for s in slots) if g is not None]
        return pick_tokens(logits, self.spec.temperature, self.spec.top_p, generators).tolist()

    def _take(self, slot: int, token: int) -> tuple[int, Reply] | None:
        """Record a picked token: an end-of-turn token ends the reply (returned), any other becomes pending."""
        if token in self.spec.stops:
            return self._release(slot, finished=True)
        self.tokens[slot].append(token)
        self.pending[slot] = token
        if len(self.tokens[slot]) == self.spec.max_new_tokens and not self.spec.records:
            return self._release(slot, finished=False)  # nothing reads the last token's activations
        return None

    def _decode_step(self) -> Iterator[tuple[int, Reply]]:
        """Feed every occupied slot its pending token; end cut replies, pick the others' next tokens."""
        spec, device = self.spec, self.lm.device
        occupied = [s for s, i in enumerate(self.occupant) if i >= 0]
        live = torch.tensor([i >= 0 for i in self.occupant], device=device)
        picking = [s for s in occupied if len(self.tokens[s]) < spec.max_new_tokens]
        out = self._forward(live, need_logits=bool(picking))
        for recorder in self.recorders:
            recorder.commit(live)
        for s in occupied:
            self.lengths[s] += 1
        if spec.on_token is not None and self.watcher is not None:
            rows = torch.tensor(occupied, device=device)
            fed = torch.tensor(self.pending, device=device)[rows]
            spec.on_token([self.occupant[s] for s in occupied], fed, self.watcher.last[rows], live[rows])
        picked = dict(zip(picking, self._pick(out.logits[picking, -1], picking))) if picking else {}
        for s in occupied:
            ended = self._take(s, picked[s]) if s in picked else self._release(s, finished=False)
            if ended is not None:
                yield ended

    def _forward(self, live: Tensor, need_logits: bool) -> Any:
        """One decode forward over all slots (captures and tracking caps restricted to `live` [slots])."""
        device = self.lm.device
        lengths = torch.tensor(self.lengths, device=device)
        self.columns.lengths, self.columns.width = lengths, max(self.lengths) + 1
        attention = torch.arange(self.columns.width, device=device)[None, :] <= lengths[:, None]
        model = self.lm.model if need_logits else self.lm.model.base_model
        with layer_hooks(self.lm.layers, self.record_ops), counting_rows(self.spec.caps, live):
            return model(input_ids=torch.tensor(self.pending, device=device)[:, None], attention_mask=attention,
                         position_ids=lengths[:, None], past_key_values=self.cache, use_cache=True,
                         **({"logits_to_keep": 1} if need_logits else {}))

    def _shrink(self) -> None:
        """Drop the empty slots once nobody waits for one: later steps compute only the replies still running."""
        keep = [s for s, i in enumerate(self.occupant) if i >= 0]
        slots = torch.tensor(keep, device=self.lm.device)
        for layer in self.layers:
            layer.keep(slots)
        for recorder in self.recorders:
            recorder.keep(slots)
        self.record_ops = merge_ops(*(r.ops() for r in self.recorders))
        self.columns.rows = torch.arange(len(keep), device=self.lm.device)
        self.occupant, self.lengths, self.pending = [self.occupant[s] for s in keep], [self.lengths[s] for s in keep], \
            [self.pending[s] for s in keep]
        self.tokens, self.generators = [self.tokens[s] for s in keep], [self.generators[s] for s in keep]

    def _release(self, slot: int, finished: bool) -> tuple[int, Reply]:
        """Empty `slot` and return its conversation's reply."""
        index, tokens = self.occupant[slot], self.tokens[slot]
        self.occupant[slot], self.lengths[slot], self.pending[slot], self.generators[slot] = -1, 0, self.pad, None
        reply = Reply(text=self.lm.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                      finished=finished, means=self.means.pop(slot).cpu() if self.means is not None else None,
                      projections=self.watcher.pop(slot) if self.watcher is not None else None)
        return index, reply
