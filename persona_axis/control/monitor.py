"""Per-turn projections of a given conversation on the Assistant Axis, and a live drift alert.

Which tokens count for a turn: the tokens of the message's content as the chat template renders
it, nothing else. Role headers, end-of-turn markers and text the template injects (a default
system prompt, a date line) are the same in every conversation and were said by nobody; leaving
them out also matches how the axis is built (decode/generate.py averages over reply tokens only, the
end-of-turn token excluded). A token counts when its characters overlap the content's characters
in the rendering (offset mapping of a fast tokenizer), so a token merged across the edge counts.

Where the content lies: message k is rendered once more with a placeholder for its content; the
text before the placeholder is everything the template puts ahead of the content, the text after
it the end of the turn. Turn k is located in the rendering of messages[:k+1] (no generation
prompt), and the text up to the end of its content must stay the same when later messages are
added ("prefix-stable"); otherwise cached turns could not be reused and we raise.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.conversations import Conversation, check_messages
from persona_axis.decode.generate import GenerationResult, generate
from persona_axis.decode.hooks import LayerOp, layer_hooks
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message, prepare_messages

_PLACEHOLDER = "\ue000persona-axis-content\ue000"  # private-use characters: absent from real messages


@dataclass
class TurnProjection:
    """One turn: its message index, role, mean projection at the chosen layer, token count, and
    the mean projection at every recorded layer ({layer: value}, the chosen layer included)."""

    index: int
    role: str
    projection: float
    n_tokens: int
    by_layer: dict[int, float]
    dropped: int = 0  # earlier messages left out of its context by a sliding window (context_window's policy)


@dataclass
class TurnProjections:
    """Per-turn projections of one conversation at `layer` (float32 means over each turn's tokens)."""

    source: str
    layer: int
    turns: list[TurnProjection]


@dataclass
class TurnLayout:
    """Token ids [n] of a rendering and, per located turn, its content tokens ids[first:last]."""

    ids: list[int]
    spans: list[tuple[int, int]]


def _render(lm: LoadedModel, messages: list[Message]) -> str:
    try:
        return lm.tokenizer.apply_chat_template(prepare_messages(messages, lm.system_role), tokenize=False)
    except (jinja2.TemplateError, ValueError) as exc:  # templates reject conversations by raising
        raise PersonaAxisError(f"the chat template of {lm.name} rejects this conversation: {exc}") from None


def _content_span(lm: LoadedModel, messages: list[Message]) -> tuple[str, int, int]:
    """Render `messages`; return (text, start, end): the last message's content in characters."""
    text = _render(lm, messages)
    marked = _render(lm, [*messages[:-1], {**messages[-1], "content": _PLACEHOLDER}])
    before, found, after = marked.partition(_PLACEHOLDER)
    if not found or _PLACEHOLDER in after or not text.startswith(before) or not text.endswith(after):
        raise PersonaAxisError(
            f"cannot locate message {len(messages)} in the rendering of {lm.name}'s chat template: "
            "the template must insert each message's content once"
        )
    return text, len(before), len(text) - len(after)


def _check_context(lm: LoadedModel, n_tokens: int) -> None:
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        raise PersonaAxisError(
            f"the conversation is {n_tokens} tokens, more than the {limit}-token context of {lm.name}: "
            "shorten it (nothing is truncated)"
        )


def turn_layout(lm: LoadedModel, messages: list[Message], start: int = 0) -> TurnLayout:
    """Render `messages` (no generation prompt), tokenize once, and locate the content tokens of
    messages[start:]. Raises if the template is not prefix-stable or the text exceeds the context."""
    located = [_content_span(lm, messages[:k]) for k in range(start + 1, len(messages) + 1)]
    text = located[-1][0]
    for k, (prefix, _, end) in enumerate(located, start + 1):
        if not text.startswith(prefix[:end]):
            raise PersonaAxisError(
                f"the chat template of {lm.name} is not prefix-stable: later messages change how message {k} "
                "is rendered, so turns cannot be fed one after another (use project_by_prefix)"
            )
    if not lm.tokenizer.is_fast:
        raise PersonaAxisError(f"per-turn projections need a fast tokenizer (offsets); {lm.name} has a slow one")
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    _check_context(lm, len(enc.input_ids))
    starts, ends = [s for s, _ in enc.offset_mapping], [e for _, e in enc.offset_mapping]
    return TurnLayout(list(enc.input_ids), [(bisect_right(ends, s), bisect_left(starts, e)) for _, s, e in located])


@torch.inference_mode()
def _forward_projections(lm: LoadedModel, ids: list[int], units: dict[int, Tensor], cache: Any = None) -> Tensor:
    """Feed ids (after what `cache` holds, if given); per-token projections [len(units), len(ids)] float32 on the CPU.

    Each layer projects on its own device, so a model sharded over devices (device_map) works too.
    """
    found: dict[int, Tensor] = {}

    def recorder(layer: int) -> LayerOp:
        def record(hidden: Tensor) -> None:
            found[layer] = (hidden[0].float() @ units[layer].to(hidden.device)).cpu()

        return record

    with layer_hooks(lm.layers, {layer: [recorder(layer)] for layer in units}):
        lm.model.base_model(input_ids=torch.tensor([ids], device=lm.device), past_key_values=cache,
                            use_cache=cache is not None)
    return torch.stack([found[layer] for layer in units])


class ConversationProjector:
    """Feeds a conversation turn by turn through the model, keeping the KV cache between turns.

    Each `add_turn` runs only the new tokens (the template text since the last turn, then the
    message's content) and returns the turn's mean projection on the unit axis at `layer` and at
    every layer in `layers`. Default layer: axis.n_layers // 2.
    """

    def __init__(self, lm: LoadedModel, axis: Axis, layers: Sequence[int] | None = None,
                 layer: int | None = None) -> None:
        from transformers import DynamicCache

        axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
        self.lm = lm
        self.layer = lm.check_layer(axis.layer_or_middle(layer))
        recorded = sorted({self.layer, *(lm.check_layer(i) for i in layers or ())})
        self._units = {i: axis.unit(i).to(lm.device) for i in recorded}
        self._cache = DynamicCache(config=lm.model.config)
        self._ids: list[int] = []
        self.messages: list[Message] = []
        self.turns: list[TurnProjection] = []

    def add_turn(self, message: Message) -> TurnProjection:
        """Feed one more message; return its projection."""
        return self.add_turns([message])[0]

    def add_turns(self, messages: Sequence[Message]) -> list[TurnProjection]:
        """Feed several messages, tokenizing the grown conversation once; return their projections."""
        if not messages:
            return []
        conversation = check_messages([*self.messages, *messages], "conversation", need_assistant=False)
        layout = turn_layout(self.lm, conversation, start=len(self.messages))
        for message, (first, last) in zip(conversation[len(self.messages):], layout.spans):
            self._feed(message, layout.ids[:last], first)
        return self.turns[-len(messages):]

    def _feed(self, message: Message, ids: list[int], first: int) -> None:
        fed = len(self._ids)
        if first < fed or ids[:fed] != self._ids:
            raise PersonaAxisError(
                f"adding message {len(self.messages) + 1} changes the tokens of earlier turns ({self.lm.name}'s "
                "template or tokenizer is not prefix-stable): use project_by_prefix"
            )
        means = _forward_projections(self.lm, ids[fed:], self._units, self._cache)[:, first - fed:].mean(1)
        by_layer = dict(zip(self._units, means.tolist()))
        self.turns.append(TurnProjection(len(self.messages), message["role"], by_layer[self.layer], len(ids) - first,
                                         by_layer))
        self.messages.append(message)
        self._ids = ids


def _messages(conversation: Conversation | Sequence[Message]) -> tuple[list[Message], str]:
    if isinstance(conversation, Conversation):
        return conversation.messages, conversation.source
    return list(conversation), ""


def project_conversation(lm: LoadedModel, axis: Axis, conversation: Conversation | Sequence[Message],
                         layers: Sequence[int] | None = None, layer: int | None = None) -> TurnProjections:
    """Per-turn projections of a given (teacher-forced) conversation in one pass: the rendering is
    tokenized once and fed turn by turn through the KV cache. Raises if it exceeds the context."""
    messages, source = _messages(conversation)
    projector = ConversationProjector(lm, axis, layers, layer)
    return TurnProjections(source, projector.layer, projector.add_turns(messages))


def _rendered_length(lm: LoadedModel, messages: list[Message]) -> int:
    return lm.token_count(_render(lm, messages))


def project_windowed(lm: LoadedModel, axis: Axis, conversation: Conversation | Sequence[Message], window: int,
                     layers: Sequence[int] | None = None, layer: int | None = None) -> TurnProjections:
    """Per-turn projections where each turn sees at most `window` tokens: the latest whole messages that fit
    with it (the system message kept; `context_window.fit_window`). A conversation that fits is projected
    in one pass, as `project_conversation`; otherwise a new pass starts wherever the window's first message
    moves. Each turn records how many earlier messages its window left out (`TurnProjection.dropped`)."""
    from persona_axis.model.context_window import fit_window

    if window < 1:
        raise PersonaAxisError(f"--window must be a positive number of tokens, not {window}")
    messages, source = _messages(conversation)
    messages = check_messages(messages, "conversation", need_assistant=False)
    head = 1 if messages and messages[0]["role"] == "system" else 0
    projector: ConversationProjector | None = None
    start = -1
    turns: list[TurnProjection] = []
    for k in range(len(messages)):
        kept, dropped = fit_window(messages[: k + 1], window, lambda m: _rendered_length(lm, m)) if k >= head \
            else (messages[:1], 0)
        if projector is None or head + dropped != start:
            projector, start = ConversationProjector(lm, axis, layers, layer), head + dropped
            turn = projector.add_turns(kept)[-1]
        else:
            turn = projector.add_turn(messages[k])
        turns.append(replace(turn, index=k, dropped=dropped))
    return TurnProjections(source, lm.check_layer(axis.layer_or_middle(layer)), turns)


def project_by_prefix(lm: LoadedModel, axis: Axis, conversation: Conversation | Sequence[Message],
                      layer: int) -> list[float]:
    """Slow reference: per turn k, a separate forward pass over the rendering of messages[:k+1],
    averaging the projection at `layer` over turn k's content tokens. Returns [turns] floats."""
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    messages = check_messages(_messages(conversation)[0], "conversation", need_assistant=False)
    layer = lm.check_layer(layer)
    units = {layer: axis.unit(layer).to(lm.device)}
    projections = []
    for k in range(1, len(messages) + 1):
        layout = turn_layout(lm, messages[:k], start=k - 1)
        first, last = layout.spans[0]
        projections.append(_forward_projections(lm, layout.ids, units)[0, first:last].mean().item())
    return projections


def plot_trajectory(results: Sequence[TurnProjections], path: str | Path, threshold: float | None = None) -> Path:
    """PNG of projection per turn: assistant turns joined by a line, user turns as lighter dots,
    one colour per conversation, and a dashed line at `threshold` when given."""
    from matplotlib.figure import (
        Figure,  # Agg canvas, no pyplot state: nothing to close
    )

    if not results:
        raise PersonaAxisError("no conversations to plot")
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for n, result in enumerate(results):
        colour = f"C{n % 10}"
        assistant = [t for t in result.turns if t.role == "assistant"]
        user = [t for t in result.turns if t.role == "user"]
        ax.plot([t.index for t in assistant], [t.projection for t in assistant], marker="o", color=colour,
                label=result.source or f"conversation {n + 1}")
        ax.plot([t.index for t in user], [t.projection for t in user], "o", color=colour, alpha=0.3)
    ax.plot([], [], "o", color="grey", alpha=0.3, label="user turns")
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set(xlabel="message index", ylabel=f"projection (layer {results[0].layer})",
           title="Position on the Assistant Axis per turn")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


class LiveAlert:
    """Running mean of the current assistant turn's per-token projections; `update` returns True
    the first time the mean falls below `threshold` once at least `min_tokens` tokens were seen."""

    def __init__(self, threshold: float, min_tokens: int = 4) -> None:
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.reset()

    def reset(self) -> None:
        """Start a new turn."""
        self.n_tokens = 0
        self.running_mean = 0.0
        self.fired = False

    def update(self, projection: float) -> bool:
        """Add one token's projection; True only on the token where the alert fires."""
        self.n_tokens += 1
        self.running_mean += (projection - self.running_mean) / self.n_tokens
        if self.fired or self.n_tokens < self.min_tokens or self.running_mean >= self.threshold:
            return False
        self.fired = True
        return True


def generate_with_alerts(lm: LoadedModel, axis: Axis, conversations: Sequence[list[Message]], layer: int,
                         threshold: float, *, min_tokens: int = 4,
                         **generate_kwargs: Any) -> tuple[GenerationResult, list[int | None]]:
    """Generate replies while watching the axis at `layer`; per conversation, the 0-based reply-token
    index at which the running-mean projection first fell below `threshold` (None if it never did)."""
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    layer = lm.check_layer(layer)
    alerts = [LiveAlert(threshold, min_tokens) for _ in conversations]
    fired: list[int | None] = [None] * len(conversations)

    def on_token(i: int, _token: int, projection: float) -> None:
        if alerts[i].update(projection):
            fired[i] = alerts[i].n_tokens - 1

    result = generate(lm, conversations, watch=(layer, axis.vectors[layer]), on_token=on_token, **generate_kwargs)
    return result, fired
