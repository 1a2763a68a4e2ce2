"""Chatting with a model while watching the Assistant Axis: replies with their projections, capped or not.

Steering coefficients are in units of the axis itself: `Addition(axis.vectors[layer], coef)`, so
coef = 1 moves an activation by the distance from the mean role vector to the default Assistant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from persona_axis.axis import Axis
from persona_axis.capping import CappingConfig
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.models import LoadedModel, Message
from persona_axis.steering import Addition, Cap, Intervention


@dataclass
class Reply:
    """One generated reply: text, its mean projection on the unit axis at every layer [layers], and cap engagement."""

    text: str
    projections: list[float]
    engaged: dict[int, float] = field(default_factory=dict)
    n_tokens: int = 0


def parse_steer(spec: str) -> tuple[float, int]:
    """'COEF@LAYER' (e.g. '-2@15') -> (coef, layer)."""
    match = re.fullmatch(r"\s*([-+]?\d*\.?\d+(?:e[-+]?\d+)?)\s*@\s*(-?\d+)\s*", spec)
    if not match:
        raise PersonaAxisError(f"--steer expects COEF@LAYER like -2@15, not {spec!r}")
    return float(match.group(1)), int(match.group(2))


def build_interventions(lm: LoadedModel, axis: Axis, config: CappingConfig | None = None,
                        experiment: str | None = None, steer: Sequence[str] = ()) -> dict[int, list[Intervention]]:
    """Caps from a config's experiment (tracking engagement) plus axis additions from COEF@LAYER specs."""
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    interventions: dict[int, list[Intervention]] = {}
    if experiment is not None:
        if config is None:
            raise PersonaAxisError("--cap needs a capping config: run `persona-axis calibrate` first or pass --config")
        config.check_model(lm)
        for cap in config.experiment(experiment).caps:
            interventions.setdefault(cap.layer, []).append(Cap(cap.axis, cap.floor, track=True))
    for spec in steer:
        coef, layer = parse_steer(spec)
        layer = lm.check_layer(layer)
        interventions.setdefault(layer, []).append(Addition(axis.vectors[layer], coef))
    return interventions


def _engagement(interventions: dict[int, list[Intervention]]) -> dict[int, float]:
    out = {}
    for layer, items in interventions.items():
        for item in items:
            if isinstance(item, Cap) and item.track:
                out[layer] = item.engaged()
                item.reset()
    return out


def reply_batch(lm: LoadedModel, axis: Axis, conversations: Sequence[list[Message]],
                interventions: dict[int, list[Intervention]] | None = None, **generate_kwargs: object) -> list[Reply]:
    """Generate the next reply of each conversation with projections on the axis at every layer.

    Cap engagement is pooled over the batch (the caps see all rows together).
    """
    result = generate(lm, conversations, interventions=interventions or {}, **generate_kwargs)  # type: ignore[arg-type]
    assert result.means is not None
    units = axis.vectors / axis.vectors.norm(dim=-1, keepdim=True)  # [layers, hidden]
    projections = (result.means * units).sum(-1)  # [n, layers]
    engaged = _engagement(interventions or {})
    return [Reply(text, row.tolist(), engaged, len(ids))
            for text, row, ids in zip(result.texts, projections, result.token_ids)]


class ChatSession:
    """A multi-turn chat: keeps the messages, generates each reply with the interventions, reports projections."""

    def __init__(self, lm: LoadedModel, axis: Axis, interventions: dict[int, list[Intervention]] | None = None,
                 system: str = "", max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> None:
        self.lm, self.axis, self.interventions = lm, axis, interventions or {}
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}

    def say(self, text: str) -> Reply:
        """Add a user turn, generate the assistant's reply, keep it in the history."""
        if not text.strip():
            raise PersonaAxisError("empty message: type something to say")
        self.messages.append({"role": "user", "content": text})
        [reply] = reply_batch(self.lm, self.axis, [self.messages], self.interventions, **self.options)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply
