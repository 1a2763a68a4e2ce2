"""Batched generation that captures response activations and applies interventions in ONE pass.

Which tokens count as the response: the generated tokens up to and excluding the first
end-of-turn token (any of the model's stop ids); padding after it never counts. The activation
of a response token is each decoder layer's output at that token's own position, i.e. the
hidden state computed when the token is fed back as input. The last token of a response cut by
`max_new_tokens` is never fed back by ordinary generation, so one extra decoder-only step (no
output head) is run for those sequences. The captured means therefore equal the means over the
response positions of a separate forward pass over prompt + response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.capture import StepMeanRecorder, StepProjectionRecorder
from persona_axis.errors import PersonaAxisError
from persona_axis.hooks import LayerOp, layer_hooks, merge_ops
from persona_axis.models import LoadedModel, Message
from persona_axis.steering import InterventionMap, check_vector, intervention_ops

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class GenerationResult:
    """Replies for n conversations, in input order.

    means: [n, len(layers), hidden] float32 per-layer means over each response's tokens, or None
    when nothing was captured. finished[i] is False when reply i was cut by max_new_tokens.
    projections[i]: per-token projections of reply i on the watched direction (when `watch` is set).
    """

    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    means: Tensor | None
    layers: list[int]
    projections: list[list[float]] | None = None

    def captured_means(self) -> Tensor:
        """`means` [n, len(layers), hidden]; raises ValueError when generate ran without capture."""
        if self.means is None:
            raise ValueError("these replies were generated without capture: pass capture=True or a list of layers")
        return self.means


# Called after every decode step with (conversation indices [b], the tokens just fed [b] long,
# their projections on the watched direction [b] float32, and which rows are response tokens [b] bool).
TokenCallback = Callable[[list[int], Tensor, Tensor, Tensor], None]


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


def _pick_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Greedy when temperature <= 0, else nucleus sampling. logits [batch, vocab] -> ids [batch]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _capture_layers(lm: LoadedModel, capture: bool | Sequence[int]) -> list[int]:
    if capture is True:
        return list(range(lm.n_layers))
    if capture is False:
        return []
    return [lm.check_layer(layer) for layer in capture]


def generate(
    lm: LoadedModel,
    conversations: Sequence[list[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    capture: bool | Sequence[int] = True,
    interventions: InterventionMap | None = None,
    watch: tuple[int, Tensor] | None = None,
    on_token: TokenCallback | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> GenerationResult:
    """Generate the assistant's next reply for each conversation, capturing activations as it goes.

    conversations: lists of {"role", "content"} messages. Batches are formed from prompts of
    similar length (left padding) and results come back in input order. capture: True for every
    layer, a list of layer indices, or False. interventions: {layer: intervention(s)} applied at
    every forward pass (see steering.py). Sampling is seeded per batch with `seed`. watch:
    (layer, direction [hidden]) records every reply token's projection on the unit direction at
    that layer (the live monitor), streamed to `on_token` as generation goes. stop_at_eos=False
    generates exactly max_new_tokens for every reply (for benchmarks: equal work in every variant).
    """
    if max_new_tokens < 1:
        raise PersonaAxisError("max_new_tokens must be at least 1")
    layers = _capture_layers(lm, capture)
    steer_ops = intervention_ops(lm, interventions or {})
    if watch is not None:
        watch = (lm.check_layer(watch[0]), check_vector(watch[1], lm.hidden_size, "watched direction"))
    prompts = [lm.chat_prompt(list(c)) for c in conversations]
    lengths = [lm.token_count(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str] = [""] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    means = torch.zeros(len(prompts), len(layers), lm.hidden_size) if layers else None
    projections: list[list[float]] | None = [[] for _ in prompts] if watch is not None else None
    bar = tqdm(total=len(prompts), desc="generating", unit="reply", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _generate_batch(lm, [prompts[i] for i in chunk], max_new_tokens, temperature, top_p, seed + start,
                                layers, steer_ops, watch, on_token, chunk, stop_at_eos)
        for row, i in enumerate(chunk):
            tokens[i], finished[i] = batch.tokens[row], batch.finished[row]
            texts[i] = lm.tokenizer.decode(tokens[i], skip_special_tokens=True)
            if means is not None and batch.means is not None:
                means[i] = batch.means[row].cpu()
            if projections is not None and batch.projections is not None:
                projections[i] = batch.projections[row]
        bar.update(len(chunk))
    bar.close()
    return GenerationResult(texts=texts, token_ids=tokens, finished=finished, means=means, layers=layers,
                            projections=projections)


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


@dataclass
class _BatchOutput:
    tokens: list[list[int]]
    finished: list[bool]
    means: Tensor | None
    projections: list[list[float]] | None


@torch.inference_mode()
def _generate_batch(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    layers: list[int],
    steer_ops: dict[int, list[LayerOp]],
    watch: tuple[int, Tensor] | None,
    on_token: TokenCallback | None,
    rows: list[int],
    stop_at_eos: bool,
) -> _BatchOutput:
    model, device = lm.model, lm.device
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    attention = enc.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    batch = attention.shape[0]
    stops = torch.tensor(stop_token_ids(lm) if stop_at_eos else [], dtype=torch.long, device=device)
    pad = torch.tensor(lm.tokenizer.pad_token_id, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    recorder = StepMeanRecorder(layers, batch, lm.hidden_size, device) if layers else None
    watcher = StepProjectionRecorder(watch[0], watch[1], batch, device) if watch is not None else None
    recorders = [r for r in (recorder, watcher) if r is not None]
    cache = preallocated_cache(model, enc.input_ids.shape[1] + max_new_tokens)
    ops = merge_ops(steer_ops, *(r.ops() for r in recorders))

    alive = torch.ones(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    with layer_hooks(lm.layers, ops):
        out = model(
            input_ids=enc.input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for step in range(max_new_tokens):
            next_ids = torch.where(alive, _pick_tokens(out.logits[:, -1], temperature, top_p, generator), pad)
            generated.append(next_ids)
            alive = alive & ~torch.isin(next_ids, stops)
            if not alive.any() or (step == max_new_tokens - 1 and not recorders):
                break
            attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
            # The last step of a cut reply only needs the decoder layers (activations, no logits).
            forward = model.base_model if step == max_new_tokens - 1 else model
            out = forward(
                input_ids=next_ids[:, None],
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **({"logits_to_keep": 1} if forward is model else {}),
            )
            for r in recorders:
                r.commit(alive)
            if on_token is not None and watcher is not None:
                on_token(rows, next_ids, watcher.last, alive)

    ids = torch.stack(generated, dim=1).tolist()
    stop_set = set(stops.tolist())
    tokens, finished = [], []
    for row in ids:
        cut = next((k for k, t in enumerate(row) if t in stop_set), None)
        tokens.append(row if cut is None else row[:cut])
        finished.append(cut is not None)
    return _BatchOutput(tokens=tokens, finished=finished, means=recorder.means() if recorder else None,
                        projections=watcher.values if watcher else None)
