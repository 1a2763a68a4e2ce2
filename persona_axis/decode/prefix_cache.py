"""Shared prompt prefixes prefilled once: prompts grouped by the tokens they begin with, and a cache of those
tokens' keys and values.

Attention is causal, so the keys and values of a prompt's first m tokens depend on those m tokens
alone, whatever follows them. Prompts that begin alike (a role's system prompt before each of its
questions, a jailbreak's long system prompt before each request) therefore need the prefill of that
beginning once: `PrefixCache` keeps the keys/values of recent prefixes, and a prompt that begins with
the first m' tokens of a cached prefix reuses them cut to m'. Only the rest of each prompt (its
suffix) is prefilled, continuing from the prefix. Results equal a whole-prompt prefill up to float
rounding (the suffix is computed in a pass of another shape; tests hold tokens equal under greedy
decoding and activations within 1e-5 relative). An admission costs at most two passes: one over the
prefixes not cached yet, one over every prompt's rest (each row continuing its own prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from persona_axis.decode.common import left_padded, preallocated_cache
from persona_axis.decode.interventions import prompt_continues

LayerKV = list[tuple[Tensor, Tensor]]  # per decoder layer: (keys, values) [rows, kv_heads, length, head_dim]
# The hooks of one prefill pass over the given rows (indices into the prompts being admitted); the bool says
# whether each row's last column is its prompt's last token (False for a shared prefix's own pass).
PassHooks = Callable[[list[int], bool], AbstractContextManager[object]]
# Shorter common beginnings are prefilled whole: on the `standard` plan (about 25 shared tokens, 8 prompts a
# role) sharing at 16 tokens ran at 0.905 of whole prefills in one bench run; 700-token jailbreak prompts, 8.3x.
MIN_SHARED = 64
MIN_SUFFIX = 2  # a suffix pass keeps at least two tokens (one-token passes are the generated tokens')


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


@dataclass
class PrefillGroup:
    """Prompts (their indices in the batch) prefilled together after a shared prefix of `shared` tokens
    (0: no sharing, each whole prompt in one pass); `cached`: that prefix's keys/values when already computed."""

    members: list[int]
    shared: int
    cached: LayerKV | None = None


Entry = tuple[Hashable, tuple[int, ...]]  # (what else the keys/values depend on, the prefix's tokens)


class PrefixCache:
    """The keys/values of the most recent `capacity` distinct prefixes, each [1, kv_heads, m, head_dim] per layer.

    An entry's key pairs the tokens with whatever else shaped their keys and values (the interventions that
    act on prompt positions, `RowSettings.prefix_key`): a prompt reuses only an entry made under its own key.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Entry, LayerKV] = OrderedDict()
        self.hits = 0  # prompts that reused a cached prefix

    def lookup(self, prompt: Sequence[int], key: Hashable = None) -> tuple[Entry, int] | None:
        """(the entry under `key` sharing the most leading tokens with `prompt`, how many it shares: m >= MIN_SHARED,
        leaving at least MIN_SUFFIX tokens of the prompt), or None."""
        best: tuple[int, Entry] | None = None
        for entry in self.entries:
            if entry[0] != key:
                continue
            m = min(common_length(entry[1], prompt), len(prompt) - MIN_SUFFIX)
            if m >= MIN_SHARED and (best is None or m > best[0]):
                best = (m, entry)
        if best is None:
            return None
        self.entries.move_to_end(best[1])
        return best[1], best[0]

    def keys_values(self, entry: Entry, m: int) -> LayerKV:
        """A cached prefix's keys/values cut to its first m tokens [1, h, m, d] per layer."""
        return [(k[:, :, :m], v[:, :, :m]) for k, v in self.entries[entry]]

    def add(self, tokens: Sequence[int], kv: LayerKV, key: Hashable = None) -> None:
        entry = (key, tuple(tokens))
        self.entries[entry] = kv
        self.entries.move_to_end(entry)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def plan_prefill(prompts: Sequence[Sequence[int]], cache: PrefixCache,
                 keys: Sequence[Hashable] | None = None) -> list[PrefillGroup]:
    """Group the entering prompts: those that begin with a cached prefix reuse it; the others are grouped with
    every later prompt under the same key (`keys[i]`, default all None) sharing at least MIN_SHARED leading
    tokens with the group's first; the rest go together, unshared. Members keep their order; every prompt is
    in one group."""
    keys = list(keys) if keys is not None else [None] * len(prompts)
    groups: list[PrefillGroup] = []
    by_cached: dict[tuple[Entry, int], PrefillGroup] = {}
    left: list[int] = []
    for i, prompt in enumerate(prompts):
        found = cache.lookup(prompt, keys[i])
        if found is None:
            left.append(i)
            continue
        if found not in by_cached:
            entry, m = found
            by_cached[found] = PrefillGroup([], m, cache.keys_values(entry, m))
            groups.append(by_cached[found])
        by_cached[found].members.append(i)
        cache.hits += 1
    alone: list[int] = []
    while left:
        first, rest = left[0], left[1:]
        partners = [j for j in rest if keys[j] == keys[first] and common_length(prompts[first], prompts[j]) >= MIN_SHARED]
        if not partners:
            alone.append(first)
            left = rest
            continue
        members = [first, *partners]
        shared = min(min(common_length(prompts[first], prompts[j]) for j in partners),
                     min(len(prompts[j]) for j in members) - MIN_SUFFIX)
        if shared < MIN_SHARED:
            alone.append(first)
            left = rest
            continue
        groups.append(PrefillGroup(members, shared))
        left = [j for j in rest if j not in partners]
    if alone:
        groups.append(PrefillGroup(alone, 0))
    return groups


def prefill(model: Any, prompts: Sequence[Sequence[int]], pad: int, device: torch.device,
            prefixes: Sequence[LayerKV | None] | None = None) -> tuple[Tensor, list[LayerKV]]:
    """One pass over `prompts`, row r continuing its own prefix's keys/values `prefixes[r]` ([1, h, P_r, d] per
    layer, or None for none); every row in the same pass.

    Layout of the pass's cache, row by row: the prefix right-aligned in the first max P columns, then the
    prompt left-padded; an attention mask hides the padding, and each token's position id counts from
    its own prefix's end, so padding changes no result. Returns the logits at each prompt's last
    position [n, vocab] and each prompt's own keys/values per layer [h, P_r + its length, d] (prefix
    columns first), ready for a slot of the KV layout.
    """
    n = len(prompts)
    given: list[LayerKV | None] = list(prefixes) if prefixes is not None else [None] * n
    lengths = [0 if kv is None else kv[0][0].shape[2] for kv in given]
    width = max(lengths)
    ids, attention, positions = left_padded(prompts, pad, device)
    cache: Any = preallocated_cache(model, width + ids.shape[1])
    if width:
        held = attention.new_zeros(n, width)
        for layer_index, layer in enumerate(cache.layers):
            keys, values = _stacked([kv[layer_index] if kv is not None else None for kv in given], lengths, width)
            layer.update(keys, values)
        for r, length in enumerate(lengths):
            held[r, width - length:] = 1
        attention = torch.cat([held, attention], dim=1)
        positions = positions + torch.tensor(lengths, device=device)[:, None]
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows: list[LayerKV] = []
    for r, prompt in enumerate(prompts):
        own = []
        for layer in cache.layers:
            keys, values = layer.keys[r], layer.values[r]
            own.append((torch.cat([keys[:, width - lengths[r]:width], keys[:, -len(prompt):]], dim=1),
                        torch.cat([values[:, width - lengths[r]:width], values[:, -len(prompt):]], dim=1)))
        rows.append(own)
    return out.logits[:, -1], rows


def _stacked(rows: Sequence[tuple[Tensor, Tensor] | None], lengths: Sequence[int],
             width: int) -> tuple[Tensor, Tensor]:
    """One layer's prefix keys and values of every row, right-aligned in `width` columns -> two [n, h, width, d]."""
    sample = next(kv for kv in rows if kv is not None)[0]
    keys = sample.new_zeros(len(rows), sample.shape[1], width, sample.shape[3])
    values = torch.zeros_like(keys)
    for r, kv in enumerate(rows):
        if kv is not None:
            keys[r, :, width - lengths[r]:] = kv[0][0]
            values[r, :, width - lengths[r]:] = kv[1][0]
    return keys, values


def shared_prefill(model: Any, prompts: Sequence[Sequence[int]], pad: int, device: torch.device,
                   cache: PrefixCache | None, keys: Sequence[Hashable] | None = None,
                   hooks: PassHooks | None = None) -> tuple[Tensor, list[LayerKV]]:
    """Prefill `prompts` (each row's logits at its last position [n, vocab] and keys/values per layer, as
    `prefill`), computing every shared prefix once: at most two passes, one over the new prefixes and one
    over every prompt's rest. cache=None prefills every whole prompt in one pass. keys: what else each
    prompt's keys/values depend on (prompts share a prefix only under equal keys). hooks(rows, prompt_ends):
    the hooks each pass runs under, for the prompts `rows` it feeds (default none)."""
    hooks = hooks or (lambda rows, ends: nullcontext())
    if cache is None:
        with hooks(list(range(len(prompts))), True):
            return prefill(model, prompts, pad, device)
    keys = list(keys) if keys is not None else [None] * len(prompts)
    groups = plan_prefill(prompts, cache, keys)
    fresh = [g for g in groups if g.shared and g.cached is None]
    if fresh:
        heads = [list(prompts[g.members[0]][: g.shared]) for g in fresh]
        # a prefix's last token is no prompt's last: "last" interventions wait (hook form and per-row form)
        with prompt_continues(), hooks([g.members[0] for g in fresh], False):
            _, computed = prefill(model, heads, pad, device)
        for group, head, kv in zip(fresh, heads, computed):
            group.cached = [(k[None], v[None]) for k, v in kv]
            cache.add(head, group.cached, keys[group.members[0]])
    order = [i for g in groups for i in g.members]
    rests = [list(prompts[i][g.shared:]) for g in groups for i in g.members]
    prefixes = [g.cached if g.shared else None for g in groups for _ in g.members]
    with hooks(order, True):
        logits, rows = prefill(model, rests, pad, device, prefixes)
    back = {i: k for k, i in enumerate(order)}
    return logits[[back[i] for i in range(len(prompts))]], [rows[back[i]] for i in range(len(prompts))]
