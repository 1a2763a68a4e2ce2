"""Chatting with a model while watching the Assistant Axis: replies with their projections, capped or not.

Interventions come from persona_axis.control.spec (CLI options, request items) or are built
in Python (persona_axis.decode.interventions). Projections are read where no intervention acts (see
persona_axis.measurement) and name their layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from persona_axis.axis import Axis
from persona_axis.control.spec import describe_interventions
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Cap, Intervention
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import measured_layer
from persona_axis.model.loading import LoadedModel, Message

if TYPE_CHECKING:
    from persona_axis.decode.engine import Engine
    from persona_axis.decode.requests import TokenEvent


@dataclass
class Reply:
    """One generated reply and its mean projections on the unit axis.

    projection: at `layer`, the measured layer (no intervention acts there). projections [layers]:
    at every layer, None at the layers an intervention changes. engaged: cap engagement by layer.
    """

    text: str
    layer: int
    projection: float
    projections: list[float | None]
    engaged: dict[int, float] = field(default_factory=dict)
    n_tokens: int = 0


def _engagement(interventions: dict[int, list[Intervention]]) -> dict[int, float]:
    out = {}
    for layer, items in interventions.items():
        for item in items:
            if isinstance(item, Cap) and item.track:
                out[layer] = item.engaged()
                item.reset()
    return out


def reply_batch(lm: LoadedModel, axis: Axis, conversations: Sequence[list[Message]],
                interventions: dict[int, list[Intervention]] | None = None, layer: int | None = None,
                **generate_kwargs: object) -> list[Reply]:
    """Generate the next reply of each conversation with projections on the axis at every layer.

    layer: where `Reply.projection` is read (default: `measured_layer`'s choice; an intervened
    layer is refused). Projections at intervened layers are None. Cap engagement is pooled over
    the batch (the caps see all rows together).
    """
    interventions = interventions or {}
    layer = measured_layer(axis, interventions, layer)
    result = generate(lm, conversations, interventions=interventions, **generate_kwargs)  # type: ignore[arg-type]
    projections = (result.captured_means() * axis.units()).sum(-1)  # [n, layers]
    engaged = _engagement(interventions)
    return [Reply(text, layer, float(row[layer]),
                  [None if k in interventions else value for k, value in enumerate(row.tolist())], engaged, len(ids))
            for text, row, ids in zip(result.texts, projections, result.token_ids)]


def reply_variants(lm: LoadedModel, axis: Axis, conversations: Sequence[list[Message]],
                   interventions: dict[int, list[Intervention]], layer: int | None = None, compare: bool = False,
                   **generate_kwargs: object) -> tuple[int, dict[str, list[Reply]]]:
    """(measured layer, {label: replies}): the replies with the interventions, labelled by
    `describe_interventions`, and with compare (or no interventions) the "plain" replies first.

    Every variant is read at the same layer, chosen for the interventions (see `measured_layer`).
    """
    layer = measured_layer(axis, interventions, layer)
    variants: dict[str, list[Reply]] = {}
    if compare or not interventions:
        variants["plain"] = reply_batch(lm, axis, conversations, {}, layer, **generate_kwargs)
    if interventions:
        variants[describe_interventions(interventions)] = reply_batch(lm, axis, conversations, interventions, layer,
                                                                      **generate_kwargs)
    return layer, variants


class ChatSession:
    """A multi-turn chat: keeps the messages, generates each reply with the interventions, reports projections.

    layer: where each reply's projection is read (default: `measured_layer`'s choice for the interventions).
    """

    def __init__(self, lm: LoadedModel, axis: Axis, interventions: dict[int, list[Intervention]] | None = None,
                 system: str = "", max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                 layer: int | None = None) -> None:
        self.lm, self.axis, self.interventions = lm, axis, interventions or {}
        self.layer = measured_layer(axis, self.interventions, layer)
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        self._engine: Engine | None = None

    def say(self, text: str) -> Reply:
        """Add a user turn, generate the assistant's reply, keep it in the history."""
        if not text.strip():
            raise PersonaAxisError("empty message: type something to say")
        self.messages.append({"role": "user", "content": text})
        [reply] = reply_batch(self.lm, self.axis, [self.messages], self.interventions, self.layer, **self.options)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply

    def stream(self, text: str, on_token: Callable[[TokenEvent], None]) -> Reply:
        """Like `say` (greedy), on the server's streaming engine: `on_token` gets each token as it is generated,
        with its projection at `self.layer` and the layers whose cap raised it."""
        from persona_axis.decode.engine import Engine
        from persona_axis.decode.requests import EndEvent, Sampling
        from persona_axis.decode.row_interventions import RowSettings

        if not text.strip():
            raise PersonaAxisError("empty message: type something to say")
        if self._engine is None:
            self._engine = Engine(self.lm, max_rows=1)  # one request at a time: always prefilled whole (idle engine)
        self.messages.append({"role": "user", "content": text})
        prompt = self.lm.prompt_ids(self.messages)
        settings = RowSettings(self.interventions, (self.layer, self.axis.unit(self.layer)))
        ends: list[EndEvent] = []
        self._engine.submit(prompt, Sampling(int(self.options["max_new_tokens"]), seed=int(self.options["seed"])),
                            settings, lambda e: ends.append(e) if isinstance(e, EndEvent) else on_token(e))
        while not ends:
            self._engine.step()
        end = ends[0]
        if end.reason == "error":
            raise PersonaAxisError(f"generation failed: {end.error}")
        self.messages.append({"role": "assistant", "content": end.text})
        projection = sum(end.projections) / len(end.projections) if end.projections else 0.0
        by_layer: list[float | None] = [None] * self.lm.n_layers
        by_layer[self.layer] = projection
        return Reply(end.text, self.layer, projection, by_layer, end.engaged, len(end.token_ids))
