"""Shared prompt prefixes prefilled once: prompts grouped by the tokens they begin with, and a cache of those
tokens' keys and values.

Attention is causal, so the keys and values of a prompt's first m tokens depend on those m tokens
alone, whatever follows them. Prompts that begin alike (a role's system prompt before each of its
questions, a jailbreak's long system prompt before each request) therefore need the prefill of that
beginning once: `PrefixCache` keeps the keys/values of recent prefixes, and a prompt that begins with
the first m' tokens of a cached prefix reuses them cut to m'. Only the rest of each prompt (its
suffix) is prefilled, continuing from the prefix. Results equal a whole-prompt prefill up to float
rounding (the suffix is computed in a pass of another shape; tests hold tokens equal under greedy
decoding and activations within 1e-5 relative).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from persona_axis.decoding import left_padded, preallocated_cache

LayerKV = list[tuple[Tensor, Tensor]]  # per decoder layer: (keys, values) [rows, kv_heads, length, head_dim]
MIN_SHARED = 16  # a shorter common beginning is not worth a pass of its own
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


class PrefixCache:
    """The keys/values of the most recent `capacity` distinct prefixes, each [1, kv_heads, m, head_dim] per layer."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self.hits = 0  # prompts that reused a cached prefix

    def lookup(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], int] | None:
        """(the cached prefix sharing the most leading tokens with `prompt`, how many it shares: m >= MIN_SHARED,
        leaving at least MIN_SUFFIX tokens of the prompt), or None."""
        best: tuple[int, tuple[int, ...]] | None = None
        for tokens in self.entries:
            m = min(common_length(tokens, prompt), len(prompt) - MIN_SUFFIX)
            if m >= MIN_SHARED and (best is None or m > best[0]):
                best = (m, tokens)
        if best is None:
            return None
        self.entries.move_to_end(best[1])
        return best[1], best[0]

    def keys_values(self, tokens: tuple[int, ...], m: int) -> LayerKV:
        """A cached prefix's keys/values cut to its first m tokens [1, h, m, d] per layer."""
        return [(k[:, :, :m], v[:, :, :m]) for k, v in self.entries[tokens]]

    def add(self, tokens: Sequence[int], kv: LayerKV) -> None:
        self.entries[tuple(tokens)] = kv
        self.entries.move_to_end(tuple(tokens))
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def plan_prefill(prompts: Sequence[Sequence[int]], cache: PrefixCache) -> list[PrefillGroup]:
    """Group the entering prompts: those that begin with a cached prefix reuse it; the others are grouped with
    every later prompt sharing at least MIN_SHARED leading tokens with the group's first; the rest go
    together, unshared. Members keep their order; every prompt is in one group."""
    groups: list[PrefillGroup] = []
    by_cached: dict[tuple[tuple[int, ...], int], PrefillGroup] = {}
    left: list[int] = []
    for i, prompt in enumerate(prompts):
        found = cache.lookup(prompt)
        if found is None:
            left.append(i)
            continue
        if found not in by_cached:
            tokens, m = found
            by_cached[found] = PrefillGroup([], m, cache.keys_values(tokens, m))
            groups.append(by_cached[found])
        by_cached[found].members.append(i)
        cache.hits += 1
    alone: list[int] = []
    while left:
        first, rest = left[0], left[1:]
        partners = [j for j in rest if common_length(prompts[first], prompts[j]) >= MIN_SHARED]
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
            prefix: LayerKV | None = None) -> tuple[Tensor, list[LayerKV]]:
    """One left-padded pass over `prompts`, continuing the shared `prefix` (keys/values [1, h, P, d]) when given.

    Returns the logits at each prompt's last position [n, vocab] and each prompt's own keys/values per
    layer [h, P + its length, d] (prefix columns first), ready for a slot of the KV layout.
    """
    shared = 0 if prefix is None else prefix[0][0].shape[2]
    ids, attention, positions = left_padded(prompts, pad, device)
    n = len(prompts)
    cache: Any = preallocated_cache(model, shared + ids.shape[1])
    if prefix is not None:
        for layer, (keys, values) in zip(cache.layers, prefix):
            layer.update(keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1))
        attention = torch.cat([attention.new_ones(n, shared), attention], dim=1)
        positions = positions + shared
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows: list[LayerKV] = []
    for r, prompt in enumerate(prompts):
        own = []
        for layer in cache.layers:
            keys, values = layer.keys[r], layer.values[r]
            if shared:
                keys = torch.cat([keys[:, :shared], keys[:, -len(prompt):]], dim=1)
                values = torch.cat([values[:, :shared], values[:, -len(prompt):]], dim=1)
            else:
                keys, values = keys[:, -len(prompt):], values[:, -len(prompt):]
            own.append((keys, values))
        rows.append(own)
    return out.logits[:, -1], rows


def shared_prefill(model: Any, prompts: Sequence[Sequence[int]], pad: int, device: torch.device,
                   cache: PrefixCache | None) -> tuple[Tensor, list[LayerKV]]:
    """Prefill `prompts` (each row's logits at its last position [n, vocab] and keys/values per layer, as
    `prefill`), computing every shared prefix once; cache=None prefills every whole prompt in one pass."""
    if cache is None:
        return prefill(model, prompts, pad, device)
    logits: list[Tensor | None] = [None] * len(prompts)
    rows: list[LayerKV | None] = [None] * len(prompts)
    for group in plan_prefill(prompts, cache):
        kv = group.cached
        if group.shared and kv is None:
            head = list(prompts[group.members[0]][: group.shared])
            _, [kv] = prefill(model, [head], pad, device)
            kv = [(k[None], v[None]) for k, v in kv]
            cache.add(head, kv)
        suffixes = [list(prompts[i][group.shared:]) for i in group.members]
        group_logits, group_rows = prefill(model, suffixes, pad, device, kv if group.shared else None)
        for k, i in enumerate(group.members):
            logits[i], rows[i] = group_logits[k], group_rows[k]
    return torch.stack([t for t in logits if t is not None]), [r for r in rows if r is not None]
