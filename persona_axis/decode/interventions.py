"""Interventions on the residual stream: each kind, its arithmetic (written once), and the hook form.

A kind is a small dataclass. `row_params()` gives its settings as tensors, and the class's
`apply_rows(hidden, params)` computes the intervened hidden states [batch, seq, hidden] for a batch
whose rows each carry their own settings (params of shape [batch, ...]) or share one ([1, ...]).
That one function serves both forms of an intervention:
- the hook form: calling the object on a decoder layer's output, one setting for the whole batch
  (`steer`, `generate(..., interventions=...)`);
- the per-row form: the serving engine's tables (decode/row_interventions.py), where every request in a
  batch has its own interventions.
Projections are computed in float32 whatever the model dtype.

Positions: "all" (every position of every forward pass: prompt and generated tokens), "last" (the
prompt's last token, then every generated token) or "reply" (generated tokens only). A pass that
feeds one token per row is a generated token's; a longer pass is the prompt's.

Inside one layer, interventions act in the order of their kind's `rank` (ablations, then caps, then
additions), the same in both forms. Adding a kind: subclass `Intervention` with a `name`, its
fields, `row_params` and `apply_rows` (and `from_request` to build it from a request item, see
control/spec.py); nothing else needs to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from persona_axis.decode.hooks import LayerOp, layer_hooks
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel
from persona_axis.vectors import unit_vector

Positions = Literal["all", "last", "reply"]
POSITIONS: tuple[Positions, ...] = ("all", "last", "reply")
KINDS: dict[str, type[Intervention]] = {}  # name -> kind, filled as kinds are defined (request items name them)


def check_vector(vector: Tensor, hidden_size: int, what: str = "vector") -> Tensor:
    """Validate a steering/axis vector [hidden] and return it as float32 on the CPU."""
    vector = torch.as_tensor(vector).detach()
    if vector.dim() != 1 or vector.shape[0] != hidden_size:
        raise PersonaAxisError(
            f"{what} has shape {tuple(vector.shape)} but the model's hidden size is {hidden_size}: "
            "use a vector computed for this model (one layer's row of an axis)"
        )
    if not torch.isfinite(vector).all():
        raise PersonaAxisError(f"{what} contains NaN or inf values: recompute it or check the file it came from")
    return vector.float().cpu()


def position_mask(positions: Tensor, seq: int, prompt_ends: bool = True, generating: bool | None = None) -> Tensor:
    """Which positions each row's intervention acts on in one pass -> [rows, seq] bool.

    positions [rows] long: indices into POSITIONS. generating: whether the pass feeds generated tokens
    (one per row) or prompt tokens; None infers it from the pass (seq == 1: generated). A prompt pass's
    last column is the prompt's last token when `prompt_ends` (False for the earlier chunks of a
    chunked prefill, and for a shared prefix prefilled on its own).
    """
    codes = positions[:, None]
    if seq == 1 if generating is None else generating:
        return torch.ones(codes.shape[0], seq, dtype=torch.bool, device=positions.device)
    column = torch.arange(seq, device=positions.device)[None, :]
    last = (column == seq - 1) & prompt_ends
    return (codes == 0) | ((codes == 1) & last)


_PROMPT_ENDS: ContextVar[bool] = ContextVar("persona_axis_prompt_ends", default=True)


@contextmanager
def prompt_continues() -> Iterator[None]:
    """Within the block, hook-form interventions treat every pass as the middle of a prompt: its last column
    is not the prompt's last token (a shared prefix prefilled on its own; decode/prefix_cache.py)."""
    token = _PROMPT_ENDS.set(False)
    try:
        yield
    finally:
        _PROMPT_ENDS.reset(token)


def project(hidden: Tensor, unit: Tensor) -> Tensor:
    """Float32 projection of hidden [b, s, h] on each row's unit direction unit [b or 1, h] -> [b, s]."""
    if unit.shape[0] == 1:
        return hidden.float() @ unit[0]
    return torch.einsum("bsh,bh->bs", hidden.float(), unit)


class RequestContext(Protocol):
    """What building interventions from request items needs (spec.SpecContext is one)."""

    @property
    def n_layers(self) -> int: ...

    def axis_vector(self, layer: int) -> Tensor:
        """The axis row at `layer` [hidden]."""

    def steering_vector(self, layer: int, units: str = "axis") -> Tensor:
        """What coef = 1 adds at `layer` [hidden]: the axis row ("axis"), or the norm of the run's mean
        default-Assistant activation ("norm") or the real-chat per-token activation norm ("real") at `layer`
        × the unit axis."""

    def default_projection(self, layer: int) -> float:
        """Projection of the run's mean default-Assistant activation on the unit axis at `layer`."""

    def cap_floors(self, experiment: str) -> list[tuple[int, Tensor, float]]:
        """(layer, axis [hidden], floor) of each cap of a capping-config experiment."""


Item = Mapping[str, Any]  # one request item: {"kind": name, ...fields of that kind} (control/spec.py)


def item_layer(item: Item, ctx: RequestContext) -> int:
    """The item's "layer": an integer in range, else a one-line error."""
    layer = item.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise PersonaAxisError(f"{item.get('kind')} needs an integer 'layer', not {layer!r}")
    if not 0 <= layer < ctx.n_layers:
        raise PersonaAxisError(f"{item.get('kind')} layer {layer} is out of range: the model has {ctx.n_layers} "
                               f"layers, choose one of 0..{ctx.n_layers - 1}")
    return layer


def item_number(item: Item, key: str, default: float | None = None) -> float:
    """The item's finite number `key` (or `default` when absent), else a one-line error."""
    value = item.get(key, default)
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise PersonaAxisError(f"{item.get('kind')} needs a finite number '{key}', not {str(value)[:40]!r}")
    return number


def item_positions(item: Item) -> Positions:
    positions = item.get("positions", "all")
    if positions not in POSITIONS:
        raise PersonaAxisError(f"{item.get('kind')} positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    return positions


@dataclass
class Intervention:
    """The base of every kind (see the module doc). `positions`: "all", "last" or "reply"."""

    positions: Positions = field(default="all", kw_only=True)
    name: ClassVar[str] = ""
    rank: ClassVar[int] = 3
    label: ClassVar[str] = "intervened"  # what replies generated with this kind are called ("capped", ...)
    counts_engagement: ClassVar[bool] = False  # whether apply_rows reports which positions it changed

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            KINDS[cls.name] = cls

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise PersonaAxisError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        self._params: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    def vectors(self) -> list[Tensor]:
        """The [hidden] vectors the intervention holds (checked against the model's hidden size)."""
        raise NotImplementedError

    def row_params(self) -> dict[str, Tensor]:
        """The settings as float32 tensors, one batch row's worth: {name: [...]} (no batch dimension)."""
        raise NotImplementedError

    @staticmethod
    def apply_rows(hidden: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(intervened hidden [b, s, h], which positions it changed [b, s] bool or None) for params [b or 1, ...]."""
        raise NotImplementedError

    def _params_for(self, hidden: Tensor) -> dict[str, Tensor]:
        """`row_params` as a batch of one, on the hidden state's device (cached per device and dtype)."""
        key = (hidden.device, hidden.dtype)
        if key not in self._params:
            self._params[key] = {k: v.to(hidden.device)[None] for k, v in self.row_params().items()}
        return self._params[key]

    def __call__(self, hidden: Tensor) -> Tensor:
        """The hook form: the intervention applied to a layer's output [b, s, h] at its positions."""
        out, changed = type(self).apply_rows(hidden, self._params_for(hidden))
        if self.positions != "all":
            code = torch.full((hidden.shape[0],), POSITIONS.index(self.positions), device=hidden.device)
            mask = position_mask(code, hidden.shape[1], prompt_ends=_PROMPT_ENDS.get())
            out = torch.where(mask[..., None], out, hidden)
            changed = changed & mask if changed is not None else None
        if changed is not None and hidden.shape[1] == 1:
            self.observe(changed[:, 0])
        return out

    def observe(self, changed: Tensor) -> None:
        """Called by the hook form after each generated-token pass with the rows it changed [b] bool."""

    def count(self, changed: int, seen: int) -> None:
        """Called by the engine when a reply ends: `changed` of its `seen` generated tokens were changed at this
        intervention's layer (kinds that count engagement)."""

    @classmethod
    def from_request(cls, item: Item, ctx: RequestContext) -> list[tuple[int, Intervention]]:
        """(layer, intervention) pairs a request item of this kind asks for; a one-line error if malformed."""
        raise PersonaAxisError(f"interventions of kind {cls.name!r} cannot be built from a request")


@dataclass
class Addition(Intervention):
    """x ← x + coef · vector."""

    vector: Tensor
    coef: float = 1.0
    name: ClassVar[str] = "steer"
    rank: ClassVar[int] = 2
    label: ClassVar[str] = "steered"

    def vectors(self) -> list[Tensor]:
        return [self.vector]

    def row_params(self) -> dict[str, Tensor]:
        return {"added": self.coef * torch.as_tensor(self.vector).float()}

    @staticmethod
    def apply_rows(hidden: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return hidden + params["added"].to(hidden.dtype)[:, None, :], None

    @classmethod
    def from_request(cls, item: Item, ctx: RequestContext) -> list[tuple[int, Intervention]]:
        """{"layer", "coef", "units": "axis" (coef × the axis row), "norm" (coef × the default-Assistant
        activation norm × the unit axis) or "real" (coef × the real-chat activation norm × the unit axis)}."""
        layer, coef, units = item_layer(item, ctx), item_number(item, "coef"), item.get("units", "axis")
        if units not in ("axis", "norm", "real"):
            raise PersonaAxisError(f"steer units must be 'axis', 'norm' or 'real', not {units!r}")
        vector = ctx.steering_vector(layer, units=units)
        return [(layer, cls(vector, coef, positions=item_positions(item)))]


@dataclass
class Ablation(Intervention):
    """x ← x − (x·d̂) d̂ + coef · d̂: remove the component along a direction, then set it to `coef`."""

    direction: Tensor
    coef: float = 0.0
    name: ClassVar[str] = "ablate"
    rank: ClassVar[int] = 0
    label: ClassVar[str] = "ablated"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unit = unit_vector(torch.as_tensor(self.direction).float(), "ablation direction")

    def vectors(self) -> list[Tensor]:
        return [self.direction]

    def row_params(self) -> dict[str, Tensor]:
        return {"unit": self._unit, "value": torch.tensor(float(self.coef))}

    @staticmethod
    def apply_rows(hidden: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        unit = params["unit"]
        shift = params["value"][:, None] - project(hidden, unit)  # [b, s]
        return hidden + (shift[..., None] * unit[:, None, :]).to(hidden.dtype), None

    @classmethod
    def from_request(cls, item: Item, ctx: RequestContext) -> list[tuple[int, Intervention]]:
        """{"layer", "value": a number (default 0) or "default" (the default-Assistant mean's projection)}:
        the component along the axis at that layer is set to the value."""
        layer = item_layer(item, ctx)
        value = ctx.default_projection(layer) if item.get("value") == "default" else item_number(item, "value", 0.0)
        return [(layer, cls(ctx.axis_vector(layer), value, positions=item_positions(item)))]


def mean_ablation(direction: Tensor, mean: Tensor, positions: Positions = "all") -> Ablation:
    """Set the component along `direction` to that of `mean` (e.g. the mean activation over a dataset)."""
    return Ablation(direction, coef=float(unit_vector(direction.float(), "ablation direction") @ mean.float()),
                    positions=positions)


@dataclass
class Cap(Intervention):
    """Floor on the projection along a unit axis: x ← x + max(0, τ − x·â) â.

    After it, x·â ≥ τ at every position it acts on; positions already at or above τ are unchanged.
    With track=True the hook form counts, over generated tokens, how many it raised: `engaged()` is
    that fraction. A decode loop names the rows that hold a response token with `count_rows` (rows of
    finished replies and empty batch slots are then not counted).
    """

    axis: Tensor
    floor: float
    track: bool = False
    name: ClassVar[str] = "cap"
    rank: ClassVar[int] = 1
    label: ClassVar[str] = "capped"
    counts_engagement: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unit = unit_vector(torch.as_tensor(self.axis).float(), "cap axis")
        self.raised = torch.zeros(())
        self.seen = torch.zeros(())
        self._counted_rows: Tensor | None = None

    def vectors(self) -> list[Tensor]:
        return [self.axis]

    def row_params(self) -> dict[str, Tensor]:
        return {"unit": self._unit, "floor": torch.tensor(float(self.floor))}

    @staticmethod
    def apply_rows(hidden: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        unit = params["unit"]
        raise_by = (params["floor"][:, None] - project(hidden, unit)).clamp_min_(0.0)  # [b, s] float32
        out = torch.addcmul(hidden, raise_by.to(hidden.dtype).unsqueeze(-1), unit.to(hidden.dtype)[:, None, :])
        return out, raise_by > 0

    @classmethod
    def from_request(cls, item: Item, ctx: RequestContext) -> list[tuple[int, Intervention]]:
        """{"experiment": a capping-config experiment id} (its caps, tracking engagement), or {"layer", "floor":
        a number or "default" (the default-Assistant mean's projection)} for one cap on the axis."""
        positions = item_positions(item)
        if "experiment" in item:
            return [(layer, cls(axis, floor, track=True, positions=positions))
                    for layer, axis, floor in ctx.cap_floors(str(item["experiment"]))]
        layer = item_layer(item, ctx)
        floor = ctx.default_projection(layer) if item.get("floor") == "default" else item_number(item, "floor")
        return [(layer, cls(ctx.axis_vector(layer), floor, track=True, positions=positions))]

    def observe(self, changed: Tensor) -> None:
        if not self.track:
            return
        rows = self._counted_rows
        if rows is None:
            self.raised = self.raised + changed.sum().cpu()
            self.seen = self.seen + changed.numel()
        else:
            self.raised = self.raised + (changed & rows).sum().cpu()
            self.seen = self.seen + rows.sum().cpu()

    def count(self, changed: int, seen: int) -> None:
        if self.track:
            self.raised, self.seen = self.raised + changed, self.seen + seen

    def count_rows(self, rows: Tensor | None) -> None:
        """Count engagement only on the batch rows where `rows` [batch] bool is true (None: every row)."""
        self._counted_rows = rows

    def engaged(self) -> float:
        """Fraction of generated-token positions this cap raised since the last reset (0 when none seen)."""
        return float(self.raised / self.seen) if self.seen > 0 else 0.0

    def reset(self) -> None:
        self.raised, self.seen = torch.zeros(()), torch.zeros(())


InterventionMap = Mapping[int, Intervention | Sequence[Intervention]]


def layer_lists(interventions: InterventionMap) -> dict[int, list[Intervention]]:
    """{layer: its interventions in the order they act} (by kind rank; stable within a kind)."""
    out: dict[int, list[Intervention]] = {}
    for layer, items in interventions.items():
        listed = [items] if isinstance(items, Intervention) else list(items)
        for item in listed:
            if not isinstance(item, Intervention):
                raise PersonaAxisError(f"layer {layer}: {item!r} is not an intervention (Addition, Ablation, Cap, ...)")
        out[layer] = sorted(listed, key=lambda item: type(item).rank)
    return out


def intervention_ops(lm: LoadedModel, interventions: InterventionMap) -> dict[int, list[LayerOp]]:
    """Validate {layer: intervention(s)} against the model and return them as hook operations."""
    ops: dict[int, list[LayerOp]] = {}
    for layer, items in layer_lists(interventions).items():
        index = lm.check_layer(layer)
        for item in items:
            for vector in item.vectors():
                check_vector(vector, lm.hidden_size, f"{type(item).__name__} vector at layer {layer}")
            ops.setdefault(index, []).append(item)
    return ops


@contextmanager
def steer(lm: LoadedModel, interventions: InterventionMap) -> Iterator[None]:
    """Apply interventions during every forward pass inside the block; hooks are removed on exit.

    Example: `with steer(lm, {12: Addition(axis[12], coef=-4.0)}): generate(lm, ...)`.
    """
    with layer_hooks(lm.layers, intervention_ops(lm, interventions)):
        yield
