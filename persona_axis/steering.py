"""Interventions on the residual stream: addition, directional ablation, mean ablation, capping.

Every intervention is a callable on a decoder layer's output [batch, seq, hidden] that returns
the modified tensor. Projections are computed in float32 whatever the model dtype. `positions`
is "all" (every position of every forward pass: prompt and generated tokens) or "last" (the last
position of each forward pass: the prompt's last token, then every generated token).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from persona_axis.errors import PersonaAxisError
from persona_axis.hooks import LayerOp, layer_hooks
from persona_axis.models import LoadedModel
from persona_axis.vectors import unit_vector

Positions = Literal["all", "last"]


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


@dataclass
class _Intervention:
    positions: Positions = field(default="all", kw_only=True)

    def __post_init__(self) -> None:
        if self.positions not in ("all", "last"):
            raise PersonaAxisError(f"positions must be 'all' or 'last', not {self.positions!r}")

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.positions == "all":
            return self.apply(hidden)
        out = hidden.clone()
        out[:, -1:] = self.apply(hidden[:, -1:])
        return out

    def apply(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def vectors(self) -> list[Tensor]:
        raise NotImplementedError


@dataclass
class Addition(_Intervention):
    """x ← x + coef · vector."""

    vector: Tensor
    coef: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scaled = self.coef * torch.as_tensor(self.vector).float()

    def apply(self, hidden: Tensor) -> Tensor:
        return hidden + self._scaled.to(hidden.device, hidden.dtype)

    def vectors(self) -> list[Tensor]:
        return [self.vector]


@dataclass
class Ablation(_Intervention):
    """x ← x − (x·d̂) d̂ + coef · d̂: remove the component along a direction, then set it to `coef`."""

    direction: Tensor
    coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unit = unit_vector(torch.as_tensor(self.direction).float(), "ablation direction")

    def apply(self, hidden: Tensor) -> Tensor:
        d = self._unit.to(hidden.device)
        proj = hidden.float() @ d
        return hidden + ((self.coef - proj)[..., None] * d).to(hidden.dtype)

    def vectors(self) -> list[Tensor]:
        return [self.direction]


def mean_ablation(direction: Tensor, mean: Tensor, positions: Positions = "all") -> Ablation:
    """Set the component along `direction` to that of `mean` (e.g. the mean activation over a dataset)."""
    return Ablation(direction, coef=float(unit_vector(direction.float(), "ablation direction") @ mean.float()),
                    positions=positions)


@dataclass
class Cap(_Intervention):
    """Floor on the projection along a unit axis: x ← x + max(0, τ − x·â) â.

    After it, x·â ≥ τ at every position; positions already at or above τ are unchanged. With
    track=True it counts, over generated tokens (forward passes of one position), how many it
    raised: `engaged()` is that fraction. A decode loop names the rows that hold a response
    token with `count_rows` (rows of finished replies and empty batch slots are then not counted).
    """

    axis: Tensor
    floor: float
    track: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unit = unit_vector(torch.as_tensor(self.axis).float(), "cap axis")
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self.raised = torch.zeros(())
        self.seen = torch.zeros(())
        self._counted_rows: Tensor | None = None

    def _units(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The unit axis in float32 and in the hidden dtype, on the hidden device (cached)."""
        key = (hidden.device, hidden.dtype)
        if key not in self._cast:
            a = self._unit.to(hidden.device)
            self._cast[key] = (a, a.to(hidden.dtype))
        return self._cast[key]

    def apply(self, hidden: Tensor) -> Tensor:
        a, a_model = self._units(hidden)
        raise_by = (self.floor - hidden.float() @ a).clamp_min_(0.0)  # projection in float32: [batch, seq]
        if self.track and hidden.shape[1] == 1:
            self._count(raise_by[:, 0] > 0)
        return torch.addcmul(hidden, raise_by.to(hidden.dtype).unsqueeze(-1), a_model)

    def _count(self, raised: Tensor) -> None:
        """Add one generated position per counted row [batch] bool, and those of them this cap raised."""
        rows = self._counted_rows
        if rows is None:
            self.raised = self.raised + raised.sum().cpu()
            self.seen = self.seen + raised.numel()
        else:
            self.raised = self.raised + (raised & rows).sum().cpu()
            self.seen = self.seen + rows.sum().cpu()

    def count_rows(self, rows: Tensor | None) -> None:
        """Count engagement only on the batch rows where `rows` [batch] bool is true (None: every row)."""
        self._counted_rows = rows

    def engaged(self) -> float:
        """Fraction of generated-token positions this cap raised since the last reset (0 when none seen)."""
        return float(self.raised / self.seen) if self.seen > 0 else 0.0

    def reset(self) -> None:
        self.raised, self.seen = torch.zeros(()), torch.zeros(())

    def vectors(self) -> list[Tensor]:
        return [self.axis]


Intervention = Addition | Ablation | Cap
InterventionMap = Mapping[int, Intervention | Sequence[Intervention]]


def intervention_ops(lm: LoadedModel, interventions: InterventionMap) -> dict[int, list[LayerOp]]:
    """Validate {layer: intervention(s)} against the model and return them as hook operations."""
    ops: dict[int, list[LayerOp]] = {}
    for layer, items in interventions.items():
        index = lm.check_layer(layer)
        for item in [items] if isinstance(items, _Intervention) else list(items):
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
