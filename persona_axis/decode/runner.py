"""The model runner: the engine's slots on the model side, and the forward passes the engine schedules.

Slot s holds one reply in progress: its keys and values in columns [0, lengths[s]) of the slot cache
(kv.slot_cache), its interventions and watched direction in the per-row tables
(row_interventions.RowInterventions) and, when the engine captures, its running per-layer means of
the reply's activations (capture.StepMeanRecorder). The runner does three kinds of pass:

- `prefill`: the prompts entering free slots, each with its slot's interventions; a beginning shared
  by several prompts under the same prompt-position interventions is prefilled once and its keys and
  values reused (decode/prefix_cache.py, also across admissions); every prompt's keys and values are then
  copied into its slot. Returns the logits at each prompt's last token.
- `prefill_chunk`: the next piece of one long prompt, into a cache of its own, copied into its slot
  at the end (so the running rows decode between a long prompt's chunks).
- `decode`: one token per slot at column lengths[s], every slot's interventions at once; the means
  of the rows that capture take this step's activations.

It holds no request state: which slot runs what, and when, is the engine's (decode/engine.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from persona_axis.decode.capture import StepMeanRecorder
from persona_axis.decode.common import preallocated_cache
from persona_axis.decode.hooks import layer_hooks, merge_ops
from persona_axis.decode.kv import SlotColumns, slot_cache
from persona_axis.decode.prefix_cache import MIN_SHARED, PrefixCache, shared_prefill
from persona_axis.decode.row_interventions import RowInterventions, RowSettings
from persona_axis.model.loading import LoadedModel


class ModelRunner:
    """The slots' caches and tables for `lm` (see the module doc). capture_layers: layers whose reply means
    the rows that capture record ([] for none). prefixes: where shared prompt beginnings are kept (None: every
    prompt is prefilled whole)."""

    def __init__(self, lm: LoadedModel, capture_layers: Sequence[int] = (), prefixes: PrefixCache | None = None) -> None:
        self.lm = lm
        device = lm.device
        self.pad = int(lm.tokenizer.pad_token_id)
        self.columns = SlotColumns(torch.zeros(0, dtype=torch.long, device=device), torch.arange(0, device=device))
        self.cache, self.layers = slot_cache(lm.model, self.columns)
        self.interventions = RowInterventions(0, lm.hidden_size, device)
        self.means = StepMeanRecorder(capture_layers, 0, lm.hidden_size, device) if capture_layers else None
        self.prefixes = prefixes
        self.lengths: list[int] = []  # columns each slot holds

    @property
    def slots(self) -> int:
        return len(self.lengths)

    # -- slots ------------------------------------------------------------------------------------

    def grow(self, extra: int) -> list[int]:
        """Add `extra` empty slots; returns their indices."""
        start, slots = self.slots, self.slots + extra
        for layer in self.layers:
            layer.resize(slots, self.columns.capacity)
        self.interventions.resize(slots)
        if self.means is not None:
            self.means.resize(slots)
        self.lengths += [0] * extra
        self.columns.rows = torch.arange(slots, device=self.lm.device)
        return list(range(start, slots))

    def ensure_capacity(self, columns: int) -> None:
        """Make every slot hold at least `columns` columns (doubling, so growth is rare)."""
        if columns > self.columns.capacity:
            capacity = max(columns, 2 * self.columns.capacity)
            for layer in self.layers:
                layer.resize(self.slots, capacity)
            self.columns.capacity = capacity

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only `slots`, in that order (slot k is then what slots[k] was)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.lm.device)
        for layer in self.layers:
            layer.keep(index)
        self.interventions.keep(index)
        if self.means is not None:
            self.means.keep(index)
        self.lengths = [self.lengths[s] for s in slots]
        self.columns.rows = torch.arange(len(self.lengths), device=self.lm.device)

    def assign(self, slot: int, settings: RowSettings) -> None:
        """Give `slot` a request's interventions and watch."""
        self.interventions.set_row(slot, settings)

    def release(self, slot: int) -> Tensor | None:
        """Empty `slot`; returns its reply's means [layers, hidden] float32 on the CPU (None without capture)."""
        self.interventions.clear_row(slot)
        self.lengths[slot] = 0
        return self.means.pop(slot).cpu() if self.means is not None else None

    # -- passes -----------------------------------------------------------------------------------

    def _prompt_hooks(self, slots: Sequence[int]) -> Any:
        """hooks(rows, prompt_ends) for prefill passes whose row r belongs to slots[rows[r]]."""
        def hooks(rows: list[int], prompt_ends: bool) -> AbstractContextManager[object]:
            index = torch.tensor([slots[r] for r in rows], device=self.lm.device)
            return layer_hooks(self.lm.layers, self.interventions.for_rows(index, counting=False,
                                                                           prompt_ends=prompt_ends))
        return hooks

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], keys: Sequence[Hashable]) -> Tensor:
        """Prefill `prompts` into `slots` (each with its slot's interventions; keys[i]: prompt i's
        `RowSettings.prefix_key`); returns the logits at each prompt's last token [n, vocab]."""
        logits, own = shared_prefill(self.lm.model, prompts, self.pad, self.lm.device, self.prefixes, keys,
                                     self._prompt_hooks(slots))
        for slot, layers, prompt in zip(slots, own, prompts):
            for layer, (k, v) in zip(self.layers, layers):
                layer.load(slot, k, v)
            self.lengths[slot] = len(prompt)
        return logits

    def chunk_cache(self, prompt_length: int) -> Any:
        """A cache of its own for a prompt prefilled chunk by chunk."""
        return preallocated_cache(self.lm.model, prompt_length)

    def prefill_chunk(self, slot: int, cache: Any, prompt: Sequence[int], start: int, end: int) -> Tensor | None:
        """Feed prompt[start:end] for `slot` into its own `cache`; at the prompt's end, copy the cache into the slot
        and return the logits at the last token [1, vocab] (None before the end)."""
        device = self.lm.device
        done = end == len(prompt)
        ops = self.interventions.for_rows(torch.tensor([slot], device=device), counting=False, prompt_ends=done)
        with layer_hooks(self.lm.layers, ops):
            out = self.lm.model(input_ids=torch.tensor([list(prompt[start:end])], device=device),
                                position_ids=torch.arange(start, end, device=device)[None, :],
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
        if not done:
            return None
        for layer, source in zip(self.layers, cache.layers):
            layer.load(slot, source.keys[0], source.values[0])
        self.lengths[slot] = len(prompt)
        return out.logits[:, -1]

    def decode(self, pending: Sequence[int], live: Sequence[bool], capturing: Sequence[bool],
               need_logits: bool) -> tuple[Tensor | None, list[float], dict[int, list[bool]]]:
        """Feed every slot its pending token (an empty slot a pad token that nothing reads).

        live [slots]: the slots holding a reply (their lengths grow by one); capturing [slots]: those whose means
        take this step. Returns (the logits [slots, vocab], or None
        when nobody picks a next token: the pass then skips the model's head), each slot's watched projection
        [slots] and {layer: [slots] whether its engagement-counting interventions changed the token}.
        """
        device = self.lm.device
        lengths = torch.tensor(self.lengths, device=device)
        self.columns.lengths, self.columns.width = lengths, max(self.lengths) + 1
        attention = torch.arange(self.columns.width, device=device)[None, :] <= lengths[:, None]
        ops = self.interventions.for_rows(None, counting=True)
        if self.means is not None:
            ops = merge_ops(ops, self.means.ops())
        model = self.lm.model if need_logits else self.lm.model.base_model
        with layer_hooks(self.lm.layers, ops):
            out = model(input_ids=torch.tensor(list(pending), device=device)[:, None], attention_mask=attention,
                        position_ids=lengths[:, None], past_key_values=self.cache, use_cache=True,
                        **({"logits_to_keep": 1} if need_logits else {}))
        if self.means is not None:
            self.means.commit(torch.tensor(list(capturing), device=device))
        self.lengths = [n + fed for n, fed in zip(self.lengths, live)]
        raised = {layer: flags.tolist() for layer, flags in self.interventions.raised.items()}
        return (out.logits[:, -1] if need_logits else None), self.interventions.projections.tolist(), raised

    def remember(self, slot: int, tokens: Sequence[int], key: Hashable) -> None:
        """Keep the keys/values of `slot`'s first len(tokens) columns (a finished conversation's prompt and reply)
        as a prefix for later prompts that begin with `tokens` (the conversation's next turn)."""
        if self.prefixes is None or len(tokens) < MIN_SHARED:
            return
        n = len(tokens)
        kv = [(layer.key_buffer[slot : slot + 1, :, :n].clone(), layer.value_buffer[slot : slot + 1, :, :n].clone())
              for layer in self.layers]
        self.prefixes.add(tokens, kv, key)
