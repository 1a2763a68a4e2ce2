"""How far two runs of one model agree: the numbers that tell whether a run's figures are signal.

Two runs that differ only in their seed (or judge, or preset) should find the same axis, the same
PC1 and the same roles at its ends. `compare_runs` measures that from two finished run directories:
per layer, cos(axis A, axis B) and |cos(PC1 A, PC1 B)| (a PC1's sign is arbitrary); at the analysis
layer (the middle one unless told, as `persona-axis analyze` chooses it), each run's cos(axis, PC1)
and, over the roles both runs kept, the Spearman correlation of their axis projections and of their
PC1 loadings and how many roles the two runs share at each end of those rankings.
PC1 is computed in the activations' own coordinates (no standardising), in float64.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from persona_axis.axis import Axis, cosine_per_layer, load_axis
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index
from persona_axis.build.persona_space import analyze_persona_space, pca
from persona_axis.store import RunLayout, RunStore, load_tensors
from persona_axis.vectors import cosine

DEFAULT_ENDS = 10  # roles compared at each end of a ranking (fewer when the runs share fewer than twice this)
MIN_SHARED_ROLES = 3


@dataclass(frozen=True)
class _Run:
    """What one run contributes: its model (name and weights hash), axis and kept role vectors."""

    root: Path
    model: str
    model_hash: str
    axis: Axis
    roles: dict[str, Tensor]  # name -> [layers, hidden]


@dataclass(frozen=True)
class RankAgreement:
    """How two runs rank the roles they both kept by one score (axis projection or PC1 loading) at one layer.

    spearman: rank correlation over the shared roles; top_*/bottom_*: the n highest (highest first) and
    lowest (lowest first) shared roles in each run; *_shared: how many names both runs put at that end;
    *_jaccard: that count over the size of the union of the two ends.
    """

    spearman: float
    n: int
    top_a: list[str]
    top_b: list[str]
    bottom_a: list[str]
    bottom_b: list[str]
    top_shared: int
    bottom_shared: int
    top_jaccard: float
    bottom_jaccard: float


@dataclass(frozen=True)
class Stability:
    """Agreement of run A and run B (see the module docstring); per-layer lists are [layers].

    cos_axis_pc1_a and _b are each run's |cos(axis, PC1)| per layer, as `analyze` reports them (unstandardised).
    """

    run_a: str
    run_b: str
    model_a: str
    model_b: str
    layers: int
    hidden: int
    layer: int
    axis_cos: list[float]
    pc1_abs_cos: list[float]
    cos_axis_pc1_a: list[float]
    cos_axis_pc1_b: list[float]
    roles_a: int
    roles_b: int
    roles_shared: int
    axis_projection: RankAgreement
    pc1_loading: RankAgreement

    def summary(self) -> dict[str, float | int]:
        """The headline figures: min (and where) and median axis cosine over layers, median |cos(PC1 A, PC1 B)|,
        and each run's cos(axis, PC1) at the analysis layer with their difference (B − A)."""
        low = min(range(self.layers), key=lambda i: self.axis_cos[i])
        a, b = self.cos_axis_pc1_a[self.layer], self.cos_axis_pc1_b[self.layer]
        return {"axis_cos_min": self.axis_cos[low], "axis_cos_min_layer": low,
                "axis_cos_median": statistics.median(self.axis_cos),
                "pc1_abs_cos_median": statistics.median(self.pc1_abs_cos),
                "cos_axis_pc1_a": a, "cos_axis_pc1_b": b, "cos_axis_pc1_difference": b - a}

    def to_json(self) -> dict[str, Any]:
        """Every field, plus "summary" (see `summary`)."""
        return {**asdict(self), "summary": self.summary()}

    def table(self) -> str:
        """A readable report: a header, one row per layer, the summary, and the role rankings at the analysis layer."""
        s = self.summary()
        model = self.model_a if self.model_a == self.model_b else f"{self.model_a} (A), {self.model_b} (B)"
        rows = [f"{self.run_a} (A) vs {self.run_b} (B): {model}, {self.layers} layers, hidden {self.hidden}; "
                f"roles kept {self.roles_a} and {self.roles_b}, {self.roles_shared} by both",
                "layer  cos(axis A, axis B)  |cos(PC1 A, PC1 B)|  |cos(axis, PC1)| A  |cos(axis, PC1)| B"]
        for i in range(self.layers):
            mark = " <" if i == self.layer else ""
            rows.append(f"{i:>5}  {self.axis_cos[i]:>19.3f}  {self.pc1_abs_cos[i]:>19.3f}  "
                        f"{self.cos_axis_pc1_a[i]:>18.3f}  {self.cos_axis_pc1_b[i]:>18.3f}{mark}")
        rows.append(f"axis cosine over layers: min {s['axis_cos_min']:.3f} (layer {s['axis_cos_min_layer']}), "
                    f"median {s['axis_cos_median']:.3f}; median |cos(PC1 A, PC1 B)| {s['pc1_abs_cos_median']:.3f}")
        rows.append(f"at layer {self.layer} (<): |cos(axis, PC1)| A {s['cos_axis_pc1_a']:.3f}, B {s['cos_axis_pc1_b']:.3f}, "
                    f"B - A {s['cos_axis_pc1_difference']:+.3f}")
        for name, ranks in (("axis projection", self.axis_projection), ("PC1 loading", self.pc1_loading)):
            rows.append(f"{name:<15} over the {self.roles_shared} shared roles: Spearman {ranks.spearman:.3f} | "
                        f"top {ranks.n} shared {ranks.top_shared} (Jaccard {ranks.top_jaccard:.2f}) | "
                        f"bottom {ranks.n} shared {ranks.bottom_shared} (Jaccard {ranks.bottom_jaccard:.2f})")
        return "\n".join(rows)


def _read_run(root: Path) -> _Run:
    """A finished run's model identity, axis and kept role vectors; a one-line error when a file is missing."""
    layout = RunLayout(root)
    vectors_path = layout.require_vectors("stability")
    if not layout.axis.is_file():
        raise PersonaAxisError(f"stability needs {layout.axis}, which is not there: finish the run first "
                               "(`persona-axis run` writes it at its axis step)")
    tensors, meta = load_tensors(vectors_path)
    if "summary" not in meta:
        raise PersonaAxisError(f"{vectors_path} does not say which roles the run kept (no summary): "
                               "recompute it with `persona-axis run`")
    kept = json.loads(meta["summary"])["roles_used"]
    identity = RunStore(root).read_manifest().get("identity", {})
    return _Run(root, str(identity.get("model", "")), str(identity.get("model_hash", "")), load_axis(layout.axis),
                {name: tensors[name] for name in kept})


def _check_same_model(a: _Run, b: _Run) -> None:
    """Refuse runs of different models: different weights, or axes of different shapes."""
    if a.model_hash and b.model_hash and a.model_hash != b.model_hash:
        raise PersonaAxisError(f"{a.root} is a run of {a.model or 'one model'} and {b.root} of {b.model or 'another'} "
                               "(different weights): stability compares two runs of one model")
    shape_a, shape_b = tuple(a.axis.vectors.shape), tuple(b.axis.vectors.shape)
    if shape_a != shape_b:
        raise PersonaAxisError(f"{a.root} has an axis of shape {list(shape_a)} and {b.root} one of {list(shape_b)} "
                               "[layers, hidden]: stability compares two runs of one model")


def _pc1_directions(roles: dict[str, Tensor]) -> Tensor:
    """PC1 of the role vectors at every layer -> [layers, hidden] float64 unit rows (each sign as `pca` fixes it)."""
    stacked = torch.stack([v.to(torch.float64) for v in roles.values()])  # [n_roles, layers, hidden]
    return torch.stack([pca(stacked[:, layer]).components[0] for layer in range(stacked.shape[1])])


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 0..n-1 of values [n] (float64), tied values sharing the mean of their ranks."""
    below = (values[None, :] < values[:, None]).sum(dim=1)
    tied = (values[None, :] == values[:, None]).sum(dim=1)
    return below.to(torch.float64) + (tied.to(torch.float64) - 1) / 2


def spearman(x: list[float], y: list[float], what: str) -> float:
    """Spearman rank correlation of two equally long lists (ties get average ranks); constant ranks are an error."""
    rx, ry = _average_ranks(torch.tensor(x, dtype=torch.float64)), _average_ranks(torch.tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    if rx.norm() == 0 or ry.norm() == 0:
        raise PersonaAxisError(f"{what} are all equal over the shared roles in one run: their rank correlation is undefined")
    return max(-1.0, min(1.0, cosine(rx, ry, what)))


def _ends(scores: dict[str, float], shared: list[str], n: int) -> tuple[list[str], list[str]]:
    """The n shared roles with the highest scores (highest first) and the n lowest (lowest first); ties by name."""
    order = sorted(shared, key=lambda role: (-scores[role], role))
    return order[:n], order[::-1][:n]


def _agreement(a: dict[str, float], b: dict[str, float], shared: list[str], n: int, what: str) -> RankAgreement:
    """How the two runs' scores a and b ({role: value}) rank the shared roles (see RankAgreement)."""
    top_a, bottom_a = _ends(a, shared, n)
    top_b, bottom_b = _ends(b, shared, n)
    top_shared, bottom_shared = len(set(top_a) & set(top_b)), len(set(bottom_a) & set(bottom_b))
    return RankAgreement(
        spearman=spearman([a[r] for r in shared], [b[r] for r in shared], what), n=n,
        top_a=top_a, top_b=top_b, bottom_a=bottom_a, bottom_b=bottom_b,
        top_shared=top_shared, bottom_shared=bottom_shared,
        top_jaccard=top_shared / len(set(top_a) | set(top_b)), bottom_jaccard=bottom_shared / len(set(bottom_a) | set(bottom_b)),
    )


def compare_runs(run_a: str | Path, run_b: str | Path, layer: int | None = None, ends: int = DEFAULT_ENDS) -> Stability:
    """Agreement of two finished runs of one model (see the module docstring).

    layer: where projections, loadings and their rankings are compared (default: the middle layer,
    layers // 2). ends: roles compared at each end, at most half the shared roles. Runs of different
    models, a missing axis or vectors file, or fewer than MIN_SHARED_ROLES roles kept by both runs
    are a PersonaAxisError.
    """
    if ends < 1:
        raise PersonaAxisError(f"ends must be at least 1 role; got {ends}")
    a, b = _read_run(Path(run_a)), _read_run(Path(run_b))
    _check_same_model(a, b)
    index = check_layer_index(a.axis.layer_or_middle(layer), a.axis.n_layers, "layer")
    shared = sorted(set(a.roles) & set(b.roles))
    if len(shared) < MIN_SHARED_ROLES:
        raise PersonaAxisError(f"{a.root} and {b.root} kept {len(shared)} roles in common; stability needs at least "
                               f"{MIN_SHARED_ROLES}: run both with the same roles")
    space_a = analyze_persona_space(a.roles, a.axis.vectors, index)
    space_b = analyze_persona_space(b.roles, b.axis.vectors, index)
    pc1_cos = cosine_per_layer(_pc1_directions(a.roles), _pc1_directions(b.roles)).abs()
    n = min(ends, len(shared) // 2)
    return Stability(
        run_a=str(run_a), run_b=str(run_b), model_a=a.model, model_b=b.model,
        layers=a.axis.n_layers, hidden=a.axis.hidden_size, layer=index,
        axis_cos=cosine_per_layer(a.axis.vectors, b.axis.vectors).tolist(), pc1_abs_cos=pc1_cos.tolist(),
        cos_axis_pc1_a=list(space_a.cos_axis_pc1), cos_axis_pc1_b=list(space_b.cos_axis_pc1),
        roles_a=len(a.roles), roles_b=len(b.roles), roles_shared=len(shared),
        axis_projection=_agreement(space_a.axis_projection, space_b.axis_projection, shared, n, "axis projections"),
        pc1_loading=_agreement(space_a.pc1_loadings, space_b.pc1_loadings, shared, n, "PC1 loadings"),
    )
