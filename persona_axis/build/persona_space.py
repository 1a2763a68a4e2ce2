"""The geometry of persona space: PCA of role vectors and how it lines up with the Assistant Axis.

Role vectors are [layers, hidden] mean activations, one per character role; the axis is
mean(default Assistant) − mean(role vectors), also [layers, hidden]. A higher projection on the
axis means more Assistant-like. PCA runs in float64 on the CPU. Results are frozen dataclasses
whose to_json() is the structure of a run's persona_space.json and from_json() reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index
from persona_axis.vectors import cosine, unit_vector

N_VARIANCE_REPORTED = 10
N_TRAITS_RANKED = 10


@dataclass
class PCAResult:
    """PCA of n role vectors, with k = min(n − 1, hidden) components.

    components: [k, hidden] unit rows, in the coordinates the PCA ran in (scaled ones if standardised).
    variance_explained: [k] fractions of the total variance, summing to 1.
    loadings: [n, k] the centred (and scaled) data projected on the components.
    scale: [hidden] the per-dimension divisor applied before the SVD (all ones unless standardised).
    """

    components: Tensor
    variance_explained: Tensor
    loadings: Tensor
    standardised: bool
    scale: Tensor


Ranking = list[tuple[str, float]]  # (name, value) pairs, in ranked order


@dataclass(frozen=True)
class PersonaSpaceAnalysis:
    """PCA of role vectors at one layer and how it lines up with the axis (see `analyze_persona_space`).

    Per-role dicts hold values at `layer`; cos_axis_pc1 is [layers]; variance_explained holds the
    first N_VARIANCE_REPORTED components. PC1 loadings are oriented so the Assistant end is positive.
    pc2_loadings is None with fewer than 3 roles, group_mean_axis_projection None without groups.
    """

    layer: int
    layers: int
    n_roles_used: int
    standardised: bool
    variance_explained: list[float]
    n_components_70: int
    cos_axis_pc1: list[float]
    pc1_loadings: dict[str, float]
    pc1_top: list[str]
    pc1_bottom: list[str]
    axis_projection: dict[str, float]
    axis_top: list[str]
    axis_bottom: list[str]
    pc2_loadings: dict[str, float] | None = None
    group_mean_axis_projection: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The persona_space.json fields of the analysis, in file order; fields that are None are left out."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PersonaSpaceAnalysis:
        """The analysis from persona_space.json fields (`to_json`'s output); other keys are ignored."""
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise PersonaAxisError(f"not a persona-space analysis: it lacks {', '.join(missing)} "
                                   "(re-run `persona-axis analyze`)")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class TraitEnds:
    """At one layer: the traits nearest each end of the axis and of PC1, as (name, cosine rounded to 4 places).

    Tops run from the highest cosine down, bottoms from the lowest up.
    """

    axis_top: Ranking
    axis_bottom: Ranking
    pc1_top: Ranking
    pc1_bottom: Ranking

    def to_json(self) -> dict[str, list[list[Any]]]:
        """The persona_space.json fields: traits_cos_axis_top/bottom, traits_cos_pc1_top/bottom as [name, cosine]."""
        ends = {"axis_top": self.axis_top, "axis_bottom": self.axis_bottom, "pc1_top": self.pc1_top,
                "pc1_bottom": self.pc1_bottom}
        return {f"traits_cos_{key}": [[name, value] for name, value in pairs] for key, pairs in ends.items()}


@dataclass(frozen=True)
class TraitAlignment:
    """Cosine of each centred trait vector with the axis (cos_axis) and with the roles' PC1 (cos_pc1).

    Both map a trait name to [layers] values (see `trait_alignment`).
    """

    cos_axis: dict[str, list[float]]
    cos_pc1: dict[str, list[float]]

    def ends(self, layer: int, n: int = N_TRAITS_RANKED) -> TraitEnds:
        """The n traits nearest each end of the axis and of PC1 at `layer`."""
        axis_top, axis_bottom = _ranked_pairs(self.cos_axis, layer, n)
        pc1_top, pc1_bottom = _ranked_pairs(self.cos_pc1, layer, n)
        return TraitEnds(axis_top, axis_bottom, pc1_top, pc1_bottom)

    def to_json(self) -> dict[str, dict[str, list[float]]]:
        """{"cos_axis": {trait: [layers]}, "cos_pc1": {trait: [layers]}}."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, list[float]]]) -> TraitAlignment:
        """The alignment from `to_json`'s output."""
        return cls({k: list(v) for k, v in data["cos_axis"].items()}, {k: list(v) for k, v in data["cos_pc1"].items()})


@dataclass(frozen=True)
class UnjudgedAlignment:
    """|cos(axis, PC1)| per layer ([layers]) for role vectors of every answer, judged or not, of n_roles roles."""

    n_roles: int
    cos_axis_pc1: list[float]


@dataclass(frozen=True)
class RunAnalysis:
    """A run's analysis as persona_space.json holds it: the PCA of its kept role vectors and what the run adds.

    roles_dropped and traits_dropped map names to their score-3 counts; unjudged is present when the
    run stored all-answer role vectors, traits when it kept at least 2 trait vectors.
    """

    space: PersonaSpaceAnalysis
    roles_dropped: dict[str, int] = field(default_factory=dict)
    traits_used: int = 0
    traits_dropped: dict[str, int] = field(default_factory=dict)
    unjudged: UnjudgedAlignment | None = None
    traits: TraitAlignment | None = None

    def trait_ends(self) -> TraitEnds | None:
        """The traits nearest each end of the axis and of PC1 at the analysis layer (None without traits)."""
        return None if self.traits is None else self.traits.ends(self.space.layer)

    def to_json(self) -> dict[str, Any]:
        """The content of persona_space.json, keys in file order."""
        out = self.space.to_json()
        out["roles_dropped"] = dict(self.roles_dropped)
        if self.unjudged is not None:
            out["n_roles_all_answers"] = self.unjudged.n_roles
            out["cos_axis_pc1_all_answers"] = list(self.unjudged.cos_axis_pc1)
        out["traits_used"], out["traits_dropped"] = self.traits_used, dict(self.traits_dropped)
        if self.traits is not None:
            out["trait_alignment"] = self.traits.to_json()
            out.update(self.traits.ends(self.space.layer).to_json())
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunAnalysis:
        """The analysis from the content of persona_space.json (trait ends are recomputed, not read)."""
        unjudged = (UnjudgedAlignment(int(data["n_roles_all_answers"]), list(data["cos_axis_pc1_all_answers"]))
                    if "cos_axis_pc1_all_answers" in data else None)
        traits = TraitAlignment.from_json(data["trait_alignment"]) if "trait_alignment" in data else None
        return cls(PersonaSpaceAnalysis.from_json(data), dict(data.get("roles_dropped", {})),
                   int(data.get("traits_used", 0)), dict(data.get("traits_dropped", {})), unjudged, traits)


def pca(vectors: Tensor, standardise: bool = False) -> PCAResult:
    """Mean-centred PCA of vectors [n_roles, hidden] via SVD (float64).

    With standardise=True each dimension is also divided by its standard deviation (dimensions
    that do not vary are left as they are). Each component's sign is fixed so that its largest
    coordinate is positive, which makes the result deterministic.
    """
    x = torch.as_tensor(vectors).detach().to(torch.float64).cpu()
    if x.dim() != 2 or x.shape[0] < 2:
        raise PersonaAxisError(f"PCA needs a [n_roles >= 2, hidden] matrix; got shape {tuple(x.shape)}")
    x = x - x.mean(dim=0)
    scale = torch.ones(x.shape[1], dtype=torch.float64)
    if standardise:
        std = x.std(dim=0)
        scale = torch.where(std > 0, std, scale)
        x = x / scale
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(x.shape[0] - 1, x.shape[1])
    singular, components = singular[:k], vh[:k]
    total = (singular**2).sum()
    if total <= 0:
        raise PersonaAxisError("all role vectors are identical: there is no variance for PCA to explain")
    peak = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, peak))
    components = components * signs
    return PCAResult(components=components, variance_explained=singular**2 / total,
                     loadings=x @ components.T, standardised=standardise, scale=scale)


def n_components_for(variance_explained: Tensor | list[float], fraction: float = 0.70) -> int:
    """Smallest k whose first k components explain at least `fraction` of the variance ([k] input)."""
    shares = torch.as_tensor(variance_explained, dtype=torch.float64)
    cumulative = torch.cumsum(shares, dim=0)
    reached = (cumulative >= fraction - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(shares)


def _check_inputs(role_vectors: Mapping[str, Tensor], axis: Tensor, layer: int) -> Tensor:
    """Validate shapes and the layer; return the roles stacked as [n_roles, layers, hidden] float64."""
    if len(role_vectors) < 2:
        raise PersonaAxisError(f"need at least 2 role vectors for PCA; got {len(role_vectors)} — "
                               "lower --min-score3 or add roles")
    if axis.dim() != 2:
        raise PersonaAxisError(f"axis must be [layers, hidden]; got shape {tuple(axis.shape)}")
    for role, vector in role_vectors.items():
        if tuple(vector.shape) != tuple(axis.shape):
            raise PersonaAxisError(f"role vector {role!r} has shape {tuple(vector.shape)} but the axis has "
                                   f"{tuple(axis.shape)}: use role vectors and an axis from the same model")
    check_layer_index(layer, axis.shape[0], "layer")
    stacked = torch.stack([torch.as_tensor(v).detach().to(torch.float64).cpu() for v in role_vectors.values()])
    if not torch.isfinite(stacked).all() or not torch.isfinite(axis).all():
        raise PersonaAxisError("role vectors or axis contain NaN or inf values: recompute them")
    return stacked


def _axis_in_pca_space(axis_row: Tensor, result: PCAResult) -> Tensor:
    """The axis direction [hidden] expressed in the (possibly scaled) coordinates the PCA ran in."""
    return axis_row / result.scale


def _pc1_per_layer(stacked: Tensor, axis: Tensor, standardise: bool = False) -> list[tuple[Tensor, PCAResult]]:
    """Per layer: PC1 of the role vectors turned toward the axis (in PCA coordinates) and the layer's PCA.

    stacked is [n_roles, layers, hidden], axis [layers, hidden]; components are float64 [hidden].
    """
    axis64 = axis.detach().to(torch.float64).cpu()
    out = []
    for layer in range(axis64.shape[0]):
        result = pca(stacked[:, layer], standardise)
        pc1 = result.components[0]
        toward_axis = cosine(pc1, _axis_in_pca_space(axis64[layer], result), f"PC1 and the axis at layer {layer}") >= 0
        out.append((pc1 if toward_axis else -pc1, result))
    return out


def _cos_axis_pc1_per_layer(stacked: Tensor, axis: Tensor, standardise: bool = False) -> list[float]:
    """|cos(axis[l], PC1 at layer l)| for every layer; stacked is [n_roles, layers, hidden], axis [layers, hidden]."""
    axis64 = axis.detach().to(torch.float64).cpu()
    return [abs(cosine(pc1, _axis_in_pca_space(axis64[layer], result), f"PC1 and the axis at layer {layer}"))
            for layer, (pc1, result) in enumerate(_pc1_per_layer(stacked, axis, standardise))]


def trait_alignment(trait_vectors: Mapping[str, Tensor], role_vectors: Mapping[str, Tensor], axis: Tensor,
                    standardise: bool = False) -> TraitAlignment:
    """How each trait lines up with the axis and with the roles' PC1, at every layer.

    trait_vectors and role_vectors map names to [layers, hidden]; axis is [layers, hidden]. A trait's
    direction is its vector minus the mean of all trait vectors (centred as PCA centres roles), so
    the ranking says which traits sit toward the Assistant end, not what all replies share.
    PC1 is oriented toward the axis (positive = Assistant end) and, when standardised, compared in
    PCA coordinates.
    """
    if len(trait_vectors) < 2:
        raise PersonaAxisError(f"need at least 2 trait vectors to centre them; got {len(trait_vectors)}")
    roles = _check_inputs(role_vectors, axis, 0)
    traits = _check_inputs(trait_vectors, axis, 0)
    centred = traits - traits.mean(0)  # [n_traits, layers, hidden]
    axis64 = axis.detach().to(torch.float64).cpu()
    names = list(trait_vectors)
    cos_axis: dict[str, list[float]] = {n: [] for n in names}
    cos_pc1: dict[str, list[float]] = {n: [] for n in names}
    for layer, (pc1, result) in enumerate(_pc1_per_layer(roles, axis, standardise)):
        for name, row in zip(names, centred[:, layer]):
            cos_axis[name].append(cosine(row, axis64[layer], f"trait {name!r} (centred) and the axis at layer {layer}"))
            cos_pc1[name].append(cosine(row / result.scale, pc1, f"trait {name!r} (centred) and PC1 at layer {layer}"))
    return TraitAlignment(cos_axis, cos_pc1)


def _ranked(scores: Mapping[str, float], top: int) -> tuple[list[str], list[str]]:
    """The `top` names with the highest scores (highest first) and lowest (lowest first)."""
    order = sorted(scores, key=lambda name: scores[name], reverse=True)
    return order[:top], order[::-1][:top]


def _ranked_pairs(values: Mapping[str, list[float]], layer: int, top: int) -> tuple[Ranking, Ranking]:
    """`_ranked` by the values at `layer` ({name: [layers]}), as (name, value rounded to 4 places) pairs."""
    high, low = _ranked({name: row[layer] for name, row in values.items()}, top)
    return [(n, round(values[n][layer], 4)) for n in high], [(n, round(values[n][layer], 4)) for n in low]


def _group_means(projection: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Mean axis projection per group, highest first; roles without a group tag are left out."""
    members: dict[str, list[float]] = {}
    for role, value in projection.items():
        if role in groups:
            members.setdefault(groups[role], []).append(value)
    means = {group: sum(values) / len(values) for group, values in members.items()}
    return dict(sorted(means.items(), key=lambda item: item[1], reverse=True))


def analyze_persona_space(role_vectors: Mapping[str, Tensor], axis: Tensor, layer: int,
                          groups: Mapping[str, str] | None = None, standardise: bool = False,
                          top: int = 5) -> PersonaSpaceAnalysis:
    """PCA of the role vectors (each [layers, hidden]) at `layer` and its relation to the axis [layers, hidden].

    PC1 loadings are oriented so that the end the axis points to (the Assistant end) is positive;
    cos_axis_pc1 covers every layer, the rest is at `layer`; `top` roles are ranked at each end.
    """
    stacked = _check_inputs(role_vectors, axis, layer)
    names = list(role_vectors)
    axis_row = axis[layer].detach().to(torch.float64).cpu()
    axis_unit = unit_vector(axis_row, f"the axis at layer {layer}")
    result = pca(stacked[:, layer], standardise)
    pc1_toward_axis = cosine(result.components[0], _axis_in_pca_space(axis_row, result),
                             f"PC1 and the axis at layer {layer}") >= 0
    pc1 = {name: (1.0 if pc1_toward_axis else -1.0) * float(v) for name, v in zip(names, result.loadings[:, 0])}
    projection = {name: float(v) for name, v in zip(names, stacked[:, layer] @ axis_unit)}
    pc1_top, pc1_bottom = _ranked(pc1, top)
    axis_top, axis_bottom = _ranked(projection, top)
    variance = [float(v) for v in result.variance_explained]
    return PersonaSpaceAnalysis(
        layer=layer, layers=int(axis.shape[0]), n_roles_used=len(names), standardised=standardise,
        variance_explained=variance[:N_VARIANCE_REPORTED], n_components_70=n_components_for(variance, 0.70),
        cos_axis_pc1=_cos_axis_pc1_per_layer(stacked, axis, standardise),
        pc1_loadings=pc1, pc1_top=pc1_top, pc1_bottom=pc1_bottom,
        axis_projection=projection, axis_top=axis_top, axis_bottom=axis_bottom,
        pc2_loadings=({name: float(v) for name, v in zip(names, result.loadings[:, 1])}
                      if result.loadings.shape[1] >= 2 else None),
        group_mean_axis_projection=_group_means(projection, groups) if groups else None,
    )


def pc1_loading_correlation(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, int]:
    """Pearson correlation of two runs' PC1 loadings over their shared roles, and how many roles are shared.

    Loadings from analyze_persona_space are already oriented to the Assistant end, so they are
    correlated as they are.
    """
    shared = sorted(set(a) & set(b))
    if len(shared) < 3:
        raise PersonaAxisError(f"need at least 3 roles shared by both runs to correlate PC1 loadings; "
                               f"got {len(shared)} — run both with the same role set")
    x = torch.tensor([a[r] for r in shared], dtype=torch.float64)
    y = torch.tensor([b[r] for r in shared], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    if x.norm() == 0 or y.norm() == 0:
        raise PersonaAxisError("PC1 loadings are constant over the shared roles in one run: correlation is undefined")
    return max(-1.0, min(1.0, cosine(x, y, "the centred PC1 loadings"))), len(shared)


def unjudged_cos_axis_pc1(default: Tensor, role_vectors: Mapping[str, Tensor], standardise: bool = False) -> list[float]:
    """|cos(axis, PC1)| per layer when every role answer counts (no judge): the judge's filter made visible.

    default [layers, hidden] is the mean default-Assistant activation; role_vectors map names to
    [layers, hidden] means over all of a role's answers. The axis is recomputed from them.
    """
    if not role_vectors:
        raise PersonaAxisError("no all-answer role vectors: the run stored none")
    stacked = torch.stack([torch.as_tensor(v).detach().to(torch.float64).cpu() for v in role_vectors.values()])
    axis = default.detach().to(torch.float64).cpu() - stacked.mean(0)
    _check_inputs(role_vectors, axis, 0)
    return _cos_axis_pc1_per_layer(stacked, axis, standardise)
