"""Chatting with a model while watching the Assistant Axis: replies with their projections, capped or not.

Steering coefficients come in two units. `COEF@LAYER` is in units of the axis itself:
`Addition(axis.vectors[layer], coef)`, so coef = 1 moves an activation by the distance from the
mean role vector to the default Assistant. `COEFn@LAYER` is in units of the typical activation
norm at that layer: coef × (norm of the run's mean default-Assistant activation at LAYER) × the
unit axis, so -0.5n moves an activation by half that norm away from the Assistant.

Projections are read where no intervention acts (see persona_axis.measurement) and name their layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.capping import CappingConfig, load_config
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.measurement import check_layer_index, measured_layer
from persona_axis.models import LoadedModel, Message, ModelShape
from persona_axis.steering import Addition, Cap, Intervention
from persona_axis.store import RunLayout, load_tensors

if TYPE_CHECKING:
    from persona_axis.engine import Engine, TokenEvent
    from persona_axis.row_interventions import RowSettings


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


@dataclass(frozen=True)
class SteerSpec:
    """One --steer: add coef × the axis at `layer` (relative=False), or coef × the mean default-Assistant
    activation norm at `layer` × the unit axis (relative=True)."""

    coef: float
    layer: int
    relative: bool = False


_STEER = re.compile(r"\s*([-+]?\d*\.?\d+(?:e[-+]?\d+)?)(n?)\s*@\s*(\d+)\s*")


def parse_steer(spec: str) -> SteerSpec:
    """'COEF@LAYER' (axis units, e.g. '-2@15') or 'COEFn@LAYER' (activation-norm units, e.g. '-0.5n@15')."""
    match = _STEER.fullmatch(spec)
    if not match:
        raise PersonaAxisError(f"--steer expects COEF@LAYER (axis units, e.g. -2@15) or COEFn@LAYER "
                               f"(units of the default activation norm, e.g. -0.5n@15), not {spec!r}")
    return SteerSpec(float(match[1]), int(match[3]), relative=bool(match[2]))


def default_norms(run_dir: str | Path) -> Tensor:
    """Norm of the run's mean default-Assistant activation per layer -> [layers] float32.

    Read from the run's vectors.safetensors "default" tensor [layers, hidden]. The norm of the
    mean is a proxy for the typical activation norm (it is at most the mean of the norms).
    """
    path = RunLayout(run_dir).require_vectors("relative steering (COEFn)")
    tensors, _ = load_tensors(path)
    if "default" not in tensors or tensors["default"].dim() != 2:
        raise PersonaAxisError(f"{path} holds no [layers, hidden] 'default' vector: re-run the vectors step")
    return tensors["default"].float().norm(dim=-1)


def steering_vector(axis: Axis, layer: int, norms: Tensor | None = None) -> Tensor:
    """What coef = 1 adds at `layer` [hidden]: the axis row, or with norms [layers] norms[layer] × the unit axis."""
    if norms is None:
        return axis.vectors[layer]
    if norms.shape != (axis.n_layers,):
        raise PersonaAxisError(f"default norms have shape {tuple(norms.shape)} but the axis has "
                               f"{axis.n_layers} layers: use the run directory the axis came from")
    return float(norms[layer]) * axis.unit(layer)


def build_interventions(lm: ModelShape, axis: Axis, config: CappingConfig | None = None,
                        experiment: str | None = None, steer: Sequence[str] = (),
                        norms: Tensor | None = None) -> dict[int, list[Intervention]]:
    """Caps from a config's experiment (tracking engagement) plus axis additions from --steer specs.

    norms [layers]: the default activation norms that COEFn@LAYER specs scale by (see `default_norms`).
    """
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    interventions: dict[int, list[Intervention]] = {}
    if experiment is not None:
        if config is None:
            raise PersonaAxisError("--cap needs a capping config: run `persona-axis calibrate` first or pass --config")
        config.check_model(lm)
        for cap in config.experiment(experiment).caps:
            interventions.setdefault(cap.layer, []).append(Cap(cap.axis, cap.floor, track=True))
    for text in steer:
        spec = parse_steer(text)
        layer = check_layer_index(spec.layer, lm.n_layers, "--steer layer")
        if spec.relative and norms is None:
            raise PersonaAxisError(f"--steer {text.strip()} is relative to activation norms: give --axis as a run "
                                   "directory (its default activations set the scale), or drop the 'n'")
        vector = steering_vector(axis, layer, norms if spec.relative else None)
        interventions.setdefault(layer, []).append(Addition(vector, spec.coef))
    return interventions


def load_interventions(lm: ModelShape, axis: Axis, axis_path: str | Path, config: str | Path | None = None,
                       cap: str | None = None, steer: Sequence[str] = ()) -> dict[int, list[Intervention]]:
    """Interventions from the command-line options shared by chat, generate and simulate.

    --config is only meaningful with --cap (an error otherwise); without --config the config is
    <axis run>/capping. COEFn@LAYER steering reads the default norms of the --axis run directory.
    """
    run_dir = Path(axis_path) if Path(axis_path).is_dir() else None
    if config is not None and cap is None:
        raise PersonaAxisError("--config is only used with --cap EXPERIMENT: name the experiment to apply")
    path = config or (RunLayout(run_dir).capping if run_dir is not None else None)
    loaded = load_config(path) if cap is not None and path is not None else None
    relative = any(parse_steer(text).relative for text in steer)
    norms = default_norms(run_dir) if relative and run_dir is not None else None
    return build_interventions(lm, axis, loaded, cap, steer, norms)


def describe_interventions(interventions: dict[int, list[Intervention]]) -> str:
    """'capped', 'steered', 'capped+steered' or 'plain': the label of replies generated with these interventions."""
    kinds = {type(item) for items in interventions.values() for item in items}
    label = "+".join(name for kind, name in ((Cap, "capped"), (Addition, "steered")) if kind in kinds)
    return label or ("intervened" if kinds else "plain")


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


def row_settings(interventions: dict[int, list[Intervention]], watch: tuple[int, Tensor] | None) -> RowSettings:
    """The serving engine's per-row form of caps and axis additions (other interventions are refused)."""
    from persona_axis.row_interventions import RowSettings

    caps: dict[int, tuple[Tensor, float]] = {}
    additions: dict[int, Tensor] = {}
    for layer, items in interventions.items():
        for item in items:
            if isinstance(item, Cap) and layer not in caps:
                caps[layer] = (item.axis.float() / item.axis.float().norm(), item.floor)
            elif isinstance(item, Addition):
                vector = item.coef * item.vector.float()
                additions[layer] = additions[layer] + vector if layer in additions else vector
            else:
                raise PersonaAxisError(f"streaming supports one cap and axis additions per layer, not {item!r}")
    return RowSettings(caps, additions, watch)


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
        from persona_axis.engine import EndEvent, Engine, Sampling

        if not text.strip():
            raise PersonaAxisError("empty message: type something to say")
        if self._engine is None:
            self._engine = Engine(self.lm, max_rows=1)  # one request at a time: always prefilled whole (idle engine)
        self.messages.append({"role": "user", "content": text})
        prompt = self.lm.prompt_ids(self.messages)
        settings = row_settings(self.interventions, (self.layer, self.axis.unit(self.layer)))
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
