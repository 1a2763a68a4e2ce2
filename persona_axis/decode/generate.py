"""Batched generation that captures response activations and applies interventions in ONE pass.

Which tokens count as the response: the generated tokens up to and excluding the first
end-of-turn token (any of the model's stop ids); padding after it never counts. The activation
of a response token is each decoder layer's output at that token's own position, i.e. the
hidden state computed when the token is fed back as input. The last token of a response cut by
`max_new_tokens` is never fed back by ordinary generation, so it is fed once more, without
picking a successor, when something reads activations (one extra decoder-only step in the
static loop). The captured means therefore equal the means over the response positions of a
separate forward pass over prompt + response.

Replies come from the decode engine (decode/engine.py): the whole list is submitted at once, a slot
whose reply ended takes the next conversation at once, and every conversation carries the call's
interventions in its own row. The static loop below, where a batch runs until its longest reply
ends, is the engine's stand-in for models it cannot batch (cache layers other than full attention,
e.g. sliding windows) and a reference in tests. Each reply samples from its own random stream
(decode/sampling.py), so its tokens and means do not depend on the other replies in its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.decode.common import (
    DecodeSpec,
    Reply,
    TokenCallback,
    counting_rows,
    left_padded,
    preallocated_cache,
    stop_token_ids,
)
from persona_axis.decode.engine import Engine
from persona_axis.decode.hooks import layer_hooks, merge_ops
from persona_axis.decode.interventions import Intervention, InterventionMap, check_vector, layer_lists
from persona_axis.decode.kv import supports_slots
from persona_axis.decode.requests import EndEvent, Event, Sampling, TokenEvent
from persona_axis.decode.row_interventions import Guard, RowSettings
from persona_axis.decode.sampling import pick_tokens, reply_generator, stream_seed
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.vectors import unit_vector

__all__ = ["GenerationResult", "Reply", "TokenCallback", "decode_spec", "generate", "stop_token_ids", "stream_replies"]


@dataclass
class GenerationResult:
    """Replies for n conversations, in input order.

    means: [n, len(layers), hidden] float32 per-layer means over each response's tokens, or None
    when nothing was captured. finished[i] is False when reply i was cut by max_new_tokens.
    projections[i]: per-token projections of reply i on the watched direction (when `watch` is set).
    guard_fired_at[i]: the token of reply i on which the guard fired, or None (when a guard was given).
    """

    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    means: Tensor | None
    layers: list[int]
    projections: list[list[float]] | None = None
    guard_fired_at: list[int | None] | None = None

    def captured_means(self) -> Tensor:
        """`means` [n, len(layers), hidden]; raises ValueError when generate ran without capture."""
        if self.means is None:
            raise ValueError("these replies were generated without capture: pass capture=True or a list of layers")
        return self.means


def _capture_layers(lm: LoadedModel, capture: bool | Sequence[int]) -> list[int]:
    if capture is True:
        return list(range(lm.n_layers))
    if capture is False:
        return []
    return [lm.check_layer(layer) for layer in capture]


def _checked(lm: LoadedModel, interventions: InterventionMap) -> dict[int, list[Intervention]]:
    """{layer index: its interventions in acting order}, each vector checked against the model."""
    out: dict[int, list[Intervention]] = {}
    for layer, items in layer_lists(interventions).items():
        for item in items:
            for vector in item.vectors():
                check_vector(vector, lm.hidden_size, f"{type(item).__name__} vector at layer {layer}")
        out.setdefault(lm.check_layer(layer), []).extend(items)
    return out


def decode_spec(lm: LoadedModel, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                capture: bool | Sequence[int] = True, interventions: InterventionMap | None = None,
                watch: tuple[int, Tensor] | None = None, on_token: TokenCallback | None = None,
                stop_at_eos: bool = True, share_prefixes: bool = True, guard: Guard | None = None) -> DecodeSpec:
    """Validate generate's options against the model (see `generate`) and bundle them for a decode loop."""
    if max_new_tokens < 1:
        raise PersonaAxisError("max_new_tokens must be at least 1")
    if guard is not None and watch is None:
        raise PersonaAxisError("a guard reads the watched projection: pass watch=(layer, direction) with it")
    if guard is not None:
        guard = Guard(guard.threshold, _checked(lm, guard.interventions), guard.min_tokens)
    if watch is not None:
        watch = (lm.check_layer(watch[0]), check_vector(watch[1], lm.hidden_size, "watched direction"))
    return DecodeSpec(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      layers=_capture_layers(lm, capture), interventions=_checked(lm, interventions or {}), watch=watch,
                      on_token=on_token, stops=frozenset(stop_token_ids(lm) if stop_at_eos else []),
                      share_prefixes=share_prefixes, guard=guard)


def stream_replies(lm: LoadedModel, conversations: Sequence[list[Message]], spec: DecodeSpec, *,
                   seed: int | Sequence[int] = 0, batch_size: int = 16,
                   continuous: bool = True) -> Iterator[tuple[int, Reply]]:
    """Yield (conversation index, Reply) for each conversation as soon as its reply ends (any order).

    spec: from `decode_spec`. seed: an int seeds conversation i's stream with stream_seed(seed, i);
    a sequence gives each conversation's stream seed. batch_size: the engine's rows. continuous=False
    runs the static loop (batches of similar prompt length, each until its longest reply ends), as
    do models whose cache has layer kinds other than full attention.
    """
    prompt_ids = [lm.prompt_ids(list(c)) for c in conversations]
    if isinstance(seed, int):
        seeds = [stream_seed(seed, i) for i in range(len(prompt_ids))]
    elif len(seed) == len(prompt_ids):
        seeds = list(seed)
    else:
        raise PersonaAxisError(f"{len(seed)} seeds for {len(prompt_ids)} conversations: give one seed per conversation")
    if not prompt_ids:
        return iter(())
    if continuous and supports_slots(lm.model):
        return _engine_replies(lm, prompt_ids, seeds, spec, batch_size)
    if spec.guard is not None:
        raise PersonaAxisError("a drift guard needs the decode engine: this model's cache (or continuous=False) "
                               "runs the static loop")
    return _static_replies(lm, prompt_ids, seeds, spec, batch_size)


def _engine_replies(lm: LoadedModel, prompt_ids: list[list[int]], seeds: list[int], spec: DecodeSpec,
                    batch_size: int) -> Iterator[tuple[int, Reply]]:
    """The whole list through one engine of `batch_size` rows; (index, Reply) as each reply ends."""
    engine = Engine(lm, max_rows=max(1, batch_size), max_waiting=len(prompt_ids),
                    prefill_chunk=max(len(p) for p in prompt_ids), capture_layers=spec.layers,
                    share_prefixes=spec.share_prefixes, shrink_patience=1, keep_conversations=False)
    watch = (spec.watch[0], unit_vector(spec.watch[1], "watched direction")) if spec.watch is not None else None
    settings = RowSettings(spec.interventions, watch, spec.guard)
    sampling = Sampling(spec.max_new_tokens, spec.temperature, spec.top_p, ignore_eos=not spec.stops)
    ended: list[tuple[int, Reply]] = []

    def listener(index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, TokenEvent):
                if spec.on_token is not None and event.projection is not None:
                    spec.on_token(index, event.token_id, event.projection)
            elif event.reason != "error":
                ended.append((index, _reply(event, spec)))
        return on_event

    for i, (prompt, seed) in enumerate(zip(prompt_ids, seeds)):
        engine.submit(prompt, replace(sampling, stream=seed), settings, listener(i), capture=bool(spec.layers))
    left = len(prompt_ids)
    while left:
        engine.step()
        if engine.failure is not None:
            raise engine.failure
        left -= len(ended)
        yield from ended
        ended.clear()


def _reply(end: EndEvent, spec: DecodeSpec) -> Reply:
    return Reply(text=end.text, token_ids=end.token_ids, finished=end.reason == "stop", means=end.means,
                 projections=end.projections if spec.watch is not None else None, guard_fired_at=end.guard_fired_at)


def generate(
    lm: LoadedModel,
    conversations: Sequence[list[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    batch_size: int = 16,
    capture: bool | Sequence[int] = True,
    interventions: InterventionMap | None = None,
    watch: tuple[int, Tensor] | None = None,
    on_token: TokenCallback | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
    continuous: bool = True,
    share_prefixes: bool = True,
    guard: Guard | None = None,
) -> GenerationResult:
    """Generate the assistant's next reply for each conversation, capturing activations as it goes.

    conversations: lists of {"role", "content"} messages; results come back in input order.
    batch_size: replies decoded together (continuous batching: slots refilled as replies end).
    capture: True for every layer, a list of layer indices, or False. interventions: {layer:
    intervention(s)} applied at every forward pass (see decode/interventions.py). Sampling: conversation i
    draws from its own stream seeded from (seed, i), or from seed[i] when a sequence is given.
    watch: (layer, direction [hidden]) records every reply token's projection on the unit
    direction at that layer (the live monitor), streamed to `on_token` as generation goes.
    stop_at_eos=False generates exactly max_new_tokens for every reply (for benchmarks: equal
    work in every variant). continuous=False runs the static loop (for comparisons). share_prefixes:
    the continuous loop prefills a prompt beginning shared by several conversations once (a role's
    system prompt, a jailbreak's; decode/prefix_cache.py): the same replies up to float rounding, faster.
    guard: interventions that start acting on a reply once the running mean of its watched projection falls
    below the guard's threshold (needs `watch`; the serving drift guard, offline).
    """
    spec = decode_spec(lm, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, capture=capture,
                       interventions=interventions, watch=watch, on_token=on_token, stop_at_eos=stop_at_eos,
                       share_prefixes=share_prefixes, guard=guard)
    n = len(conversations)
    texts, tokens, finished = [""] * n, [[] for _ in range(n)], [False] * n  # type: ignore[var-annotated]
    means = torch.zeros(n, len(spec.layers), lm.hidden_size) if spec.layers else None
    projections: list[list[float]] | None = [[] for _ in range(n)] if watch is not None else None
    fired: list[int | None] | None = [None] * n if guard is not None else None
    with tqdm(total=n, desc="generating", unit="reply", disable=not progress) as bar:
        for i, reply in stream_replies(lm, conversations, spec, seed=seed, batch_size=batch_size, continuous=continuous):
            texts[i], tokens[i], finished[i] = reply.text, reply.token_ids, reply.finished
            if means is not None and reply.means is not None:
                means[i] = reply.means
            if projections is not None and reply.projections is not None:
                projections[i] = reply.projections
            if fired is not None:
                fired[i] = reply.guard_fired_at
            bar.update(1)
    return GenerationResult(texts=texts, token_ids=tokens, finished=finished, means=means, layers=spec.layers,
                            projections=projections, guard_fired_at=fired)


def _static_replies(lm: LoadedModel, prompt_ids: list[list[int]], seeds: list[int], spec: DecodeSpec,
                    batch_size: int) -> Iterator[tuple[int, Reply]]:
    """The static loop: batches of similar prompt length (longest first), each decoded until its last reply ends."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        replies = _static_batch(lm, [prompt_ids[i] for i in rows], [seeds[i] for i in rows], spec, rows)
        yield from zip(rows, replies)


@torch.inference_mode()
def _static_batch(lm: LoadedModel, prompt_ids: list[list[int]], seeds: list[int], spec: DecodeSpec,
                  rows: list[int]) -> list[Reply]:
    model, device = lm.model, lm.device
    ids, attention, positions = left_padded(prompt_ids, lm.tokenizer.pad_token_id, device)
    batch = len(prompt_ids)
    stops = torch.tensor(sorted(spec.stops), dtype=torch.long, device=device)
    pad = torch.tensor(lm.tokenizer.pad_token_id, device=device)
    generators = [reply_generator(s, device) for s in seeds] if spec.temperature > 0 else []
    recorder, watcher = spec.recorders(lm, batch)
    recorders = [r for r in (recorder, watcher) if r is not None]
    cache = preallocated_cache(model, ids.shape[1] + spec.max_new_tokens)
    ops = merge_ops(spec.interventions, *(r.ops() for r in recorders))

    alive = torch.ones(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    with layer_hooks(lm.layers, ops):
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        for step in range(spec.max_new_tokens):
            picked = pick_tokens(out.logits[:, -1], spec.temperature, spec.top_p, generators)
            next_ids = torch.where(alive, picked, pad)
            generated.append(next_ids)
            alive = alive & ~torch.isin(next_ids, stops)
            if not alive.any() or (step == spec.max_new_tokens - 1 and not spec.records):
                break
            attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
            # The last step of a cut reply only needs the decoder layers (activations, no logits).
            forward = model.base_model if step == spec.max_new_tokens - 1 else model
            with counting_rows(spec.caps, alive):
                out = forward(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                              past_key_values=cache, use_cache=True,
                              **({"logits_to_keep": 1} if forward is model else {}))
            for r in recorders:
                r.commit(alive)
            if spec.on_token is not None and watcher is not None:
                for row, token, value, counts in zip(rows, next_ids.tolist(), watcher.last.tolist(), alive.tolist()):
                    if counts:
                        spec.on_token(row, token, value)
    means = recorder.means().cpu() if recorder else None
    return [_static_reply(lm, row, spec.stops, means[k] if means is not None else None,
                          watcher.values[k] if watcher else None)
            for k, row in enumerate(torch.stack(generated, dim=1).tolist())]


def _static_reply(lm: LoadedModel, row: list[int], stops: frozenset[int], means: Tensor | None,
                  projections: list[float] | None) -> Reply:
    """A batch row's reply: the tokens before its first end-of-turn token."""
    cut = next((k for k, t in enumerate(row) if t in stops), None)
    tokens = row if cut is None else row[:cut]
    return Reply(text=lm.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens, finished=cut is not None,
                 means=means, projections=projections)
