"""PCA of persona space on synthetic role vectors whose answers are known by construction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from persona_axis.build.persona_space import (
    PersonaSpaceAnalysis,
    RunAnalysis,
    UnjudgedAlignment,
    analyze_persona_space,
    n_components_for,
    pc1_loading_correlation,
    pca,
    trait_alignment,
    unjudged_cos_axis_pc1,
)
from persona_axis.errors import PersonaAxisError

LAYERS, HIDDEN, N_ROLES = 4, 32, 12


def synthetic(seed: int = 0, noise: float = 0.02) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, float]]:
    """Role vectors default − a·direction + noise, one direction per layer.

    Returns (role_vectors {role: [layers, hidden]}, axis [layers, hidden], direction [layers, hidden] unit rows,
    the coefficient a of each role).
    """
    g = torch.Generator().manual_seed(seed)
    default = torch.randn(LAYERS, HIDDEN, generator=g)
    direction = torch.randn(LAYERS, HIDDEN, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    coefs = {f"role{i:02d}": float(a) for i, a in enumerate(torch.linspace(0.5, 3.0, N_ROLES))}
    roles = {name: default - a * direction + noise * torch.randn(LAYERS, HIDDEN, generator=g)
             for name, a in coefs.items()}
    axis = default - torch.stack(list(roles.values())).mean(dim=0)
    return roles, axis, direction, coefs


def test_pca_recovers_the_direction_at_every_layer() -> None:
    roles, _, direction, _ = synthetic()
    stacked = torch.stack(list(roles.values()))
    for layer in range(LAYERS):
        result = pca(stacked[:, layer])
        assert abs(float(result.components[0].double() @ direction[layer].double())) > 0.95


def test_pca_shapes_unit_rows_and_variance_sum() -> None:
    vectors = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    for standardise in (False, True):
        result = pca(vectors, standardise=standardise)
        assert result.components.shape == (5, 10)
        assert result.loadings.shape == (6, 5)
        assert result.standardised is standardise
        assert torch.allclose(result.components.norm(dim=1), torch.ones(5, dtype=torch.float64))
        assert float(result.variance_explained.sum()) == pytest.approx(1.0)
        assert bool((result.variance_explained[:-1] >= result.variance_explained[1:]).all())


def test_pca_loadings_are_centred_data_on_components() -> None:
    vectors = torch.randn(5, 7, generator=torch.Generator().manual_seed(2)).double()
    result = pca(vectors)
    centred = vectors - vectors.mean(dim=0)
    assert torch.allclose(result.loadings, centred @ result.components.T)
    # with k = n − 1 components the centred data is reconstructed exactly
    assert torch.allclose(result.loadings @ result.components, centred, atol=1e-10)


def test_pca_standardise_ignores_scale_of_a_dimension() -> None:
    vectors = torch.randn(8, 4, generator=torch.Generator().manual_seed(3)).double()
    stretched = vectors * torch.tensor([1.0, 1000.0, 1.0, 1.0], dtype=torch.float64)
    plain, scaled = pca(stretched), pca(stretched, standardise=True)
    assert float(plain.variance_explained[0]) > 0.99  # dominated by the stretched dimension
    assert torch.allclose(scaled.variance_explained, pca(vectors, standardise=True).variance_explained)
    assert torch.allclose(scaled.loadings.abs(), pca(vectors, standardise=True).loadings.abs())


def test_variance_of_a_constructed_case_and_n_components() -> None:
    # eight roles at ±sqrt(variance) on four orthogonal axes: variances 5, 3, 1, 1
    spreads = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64).sqrt()
    vectors = torch.cat([torch.diag(spreads), -torch.diag(spreads)])  # [8, 4], mean zero
    shares = pca(vectors).variance_explained
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64))
    assert n_components_for(shares) == 2
    assert n_components_for(shares, 0.5) == 1
    assert n_components_for(shares, 0.85) == 3
    assert n_components_for([0.7, 0.3]) == 1


def test_analysis_finds_axis_and_ranks_roles() -> None:
    roles, axis, _, coefs = synthetic()
    analysis = analyze_persona_space(roles, axis, layer=2, top=3)
    assert analysis.layers == LAYERS and analysis.layer == 2 and analysis.n_roles_used == N_ROLES
    assert len(analysis.cos_axis_pc1) == LAYERS
    assert all(c > 0.95 for c in analysis.cos_axis_pc1)
    by_a = sorted(coefs, key=lambda r: coefs[r])
    assert analysis.axis_top == by_a[:3]  # the smallest a is closest to the Assistant
    assert analysis.axis_bottom == by_a[::-1][:3]
    # PC1 is oriented to the Assistant end, so it ranks roles the same way as the axis
    assert analysis.pc1_top == by_a[:3] and analysis.pc1_bottom == by_a[::-1][:3]
    assert sum(analysis.variance_explained) <= 1.0 + 1e-9
    assert analysis.variance_explained[0] > 0.9 and analysis.n_components_70 == 1
    assert len(analysis.variance_explained) == 10
    assert set(analysis.pc2_loadings) == set(roles)
    json.dumps(analysis.to_json())


def test_axis_projection_values() -> None:
    roles, axis, _, _ = synthetic()
    analysis = analyze_persona_space(roles, axis, layer=1)
    unit = axis[1] / axis[1].norm()
    for name, vector in roles.items():
        assert analysis.axis_projection[name] == pytest.approx(float(vector[1] @ unit), rel=1e-5)


def test_orientation_does_not_depend_on_pca_sign() -> None:
    roles, axis, _, _ = synthetic()
    flipped = {name: -vector for name, vector in roles.items()}
    # negating every vector flips the axis too; the Assistant end must still come out on top
    a = analyze_persona_space(roles, axis, layer=0)
    b = analyze_persona_space(flipped, -axis, layer=0)
    assert a.pc1_top == b.pc1_top
    assert pc1_loading_correlation(a.pc1_loadings, b.pc1_loadings)[0] == pytest.approx(1.0)


def test_standardised_analysis_and_groups() -> None:
    roles, axis, _, coefs = synthetic(noise=0.01)
    groups = {name: "near" if a < 1.5 else "far" for name, a in coefs.items()}
    analysis = analyze_persona_space(roles, axis, layer=3, groups=groups, standardise=True)
    assert analysis.standardised is True
    assert all(c > 0.9 for c in analysis.cos_axis_pc1)
    means = analysis.group_mean_axis_projection
    assert list(means) == ["near", "far"] and means["near"] > means["far"]


def test_two_roles_have_one_component_and_no_pc2() -> None:
    roles, axis, _, _ = synthetic()
    two = dict(list(roles.items())[:2])
    analysis = analyze_persona_space(two, axis, layer=0)
    assert analysis.variance_explained == pytest.approx([1.0])
    assert analysis.pc2_loadings is None and analysis.group_mean_axis_projection is None


def test_too_few_roles_is_a_clear_error() -> None:
    roles, axis, _, _ = synthetic()
    with pytest.raises(PersonaAxisError, match="need at least 2 role vectors for PCA; got 1"):
        analyze_persona_space(dict(list(roles.items())[:1]), axis, layer=0)


def test_bad_layer_and_shape_are_errors() -> None:
    roles, axis, _, _ = synthetic()
    with pytest.raises(PersonaAxisError, match="out of range"):
        analyze_persona_space(roles, axis, layer=LAYERS)
    with pytest.raises(PersonaAxisError, match="shape"):
        analyze_persona_space(roles, axis[:, :8], layer=0)


def test_loading_correlation() -> None:
    a = {"x": 1.0, "y": 2.0, "z": 4.0, "only_a": 9.0}
    b = {"x": 1.0, "y": 2.0, "z": 4.0, "only_b": -3.0}
    assert pc1_loading_correlation(a, b) == (pytest.approx(1.0), 3)
    negated = {k: -v for k, v in a.items()}
    assert pc1_loading_correlation(a, negated) == (pytest.approx(-1.0), 4)
    with pytest.raises(PersonaAxisError, match="at least 3 roles shared"):
        pc1_loading_correlation({"x": 1.0, "y": 2.0}, {"x": 1.0, "y": 2.0, "z": 3.0})


def test_trait_alignment_ranks_traits_along_the_axis_and_pc1() -> None:
    torch.manual_seed(0)
    layers, hidden = 2, 12
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    # Roles spread along `direction` (so PC1 is it) plus small noise; the axis points along it too.
    roles = {f"r{i}": (float(i) * direction + 0.01 * torch.randn(hidden)).repeat(layers, 1) for i in range(6)}
    axis = direction.repeat(layers, 1) * 3
    base = torch.randn(hidden) * 5  # shared by every trait: centring must remove it
    other = torch.zeros(hidden)
    other[1] = 1.0  # orthogonal to the axis
    traits = {"assistantish": base + 2 * direction, "theatrical": base - 2 * direction,
              "neutral": base + 2 * other, "neutral_too": base - 2 * other}
    alignment = trait_alignment({k: v.repeat(layers, 1) for k, v in traits.items()}, roles, axis)
    for key in ("cos_axis", "cos_pc1"):
        values = {name: getattr(alignment, key)[name][1] for name in traits}
        assert values["assistantish"] > 0.99 and values["theatrical"] < -0.99 and abs(values["neutral"]) < 0.05
    with pytest.raises(PersonaAxisError, match="at least 2 trait vectors"):
        trait_alignment({"one": axis}, roles, axis)


def test_unjudged_cos_axis_pc1_recomputes_the_axis_from_all_answers() -> None:
    torch.manual_seed(1)
    layers, hidden = 3, 10
    direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    roles = {f"r{i}": (float(i) * direction + 0.01 * torch.randn(hidden)).repeat(layers, 1) for i in range(5)}
    default_on_line = (10.0 * direction).repeat(layers, 1)
    assert min(unjudged_cos_axis_pc1(default_on_line, roles)) > 0.99
    off_line = torch.zeros(hidden)
    off_line[int(direction.abs().argmin())] = 50.0
    default_off_line = (2.0 * direction + off_line).repeat(layers, 1)  # the roles' mean plus an orthogonal offset
    assert max(unjudged_cos_axis_pc1(default_off_line, roles)) < 0.2


def tiny_run_analysis() -> RunAnalysis:
    """Three roles and three traits in 2-D, the same at both layers, with every figure known by hand.

    Roles [1, 0], [2, 1], [3, 0] centre to [-1, -1/3], [0, 2/3], [1, -1/3]: variances 2 along x and
    2/3 along y, so PC1 = x (3/4 of the variance) and PC2 = y. The axis [2, 0] is x as well. The
    traits centre to [1, -1/3], [-1, -1/3], [0, 2/3]: cosines 3/√10, −3/√10 and 0 with x.
    """
    roles = {"r0": torch.tensor([1.0, 0.0]), "r1": torch.tensor([2.0, 1.0]), "r2": torch.tensor([3.0, 0.0])}
    traits = {"t0": torch.tensor([1.0, 0.0]), "t1": torch.tensor([-1.0, 0.0]), "t2": torch.tensor([0.0, 1.0])}
    axis = torch.tensor([2.0, 0.0]).repeat(2, 1)
    roles, traits = {k: v.repeat(2, 1) for k, v in roles.items()}, {k: v.repeat(2, 1) + 7.0 for k, v in traits.items()}
    space = analyze_persona_space(roles, axis, layer=1, groups={"r0": "a", "r1": "a", "r2": "b"})
    return RunAnalysis(space, roles_dropped={"r9": 1}, traits_used=3, traits_dropped={"t9": 0},
                       unjudged=UnjudgedAlignment(4, [0.5, 0.25]), traits=trait_alignment(traits, roles, axis))


def rounded(value: object) -> object:
    """Floats rounded to 6 places, through nested dicts and lists (key order kept)."""
    if isinstance(value, float):
        return round(value, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


C = round(3 / math.sqrt(10), 6)
PERSONA_SPACE_JSON = {  # what persona_space.json holds for tiny_run_analysis, keys in file order
    "layer": 1, "layers": 2, "n_roles_used": 3, "standardised": False,
    "variance_explained": [0.75, 0.25], "n_components_70": 1, "cos_axis_pc1": [1.0, 1.0],
    "pc1_loadings": {"r0": -1.0, "r1": 0.0, "r2": 1.0}, "pc1_top": ["r2", "r1", "r0"], "pc1_bottom": ["r0", "r1", "r2"],
    "axis_projection": {"r0": 1.0, "r1": 2.0, "r2": 3.0}, "axis_top": ["r2", "r1", "r0"],
    "axis_bottom": ["r0", "r1", "r2"], "pc2_loadings": {"r0": round(-1 / 3, 6), "r1": round(2 / 3, 6), "r2": round(-1 / 3, 6)},
    "group_mean_axis_projection": {"b": 3.0, "a": 1.5},
    "roles_dropped": {"r9": 1}, "n_roles_all_answers": 4, "cos_axis_pc1_all_answers": [0.5, 0.25],
    "traits_used": 3, "traits_dropped": {"t9": 0},
    "trait_alignment": {"cos_axis": {"t0": [C, C], "t1": [-C, -C], "t2": [0.0, 0.0]},
                        "cos_pc1": {"t0": [C, C], "t1": [-C, -C], "t2": [0.0, 0.0]}},
    "traits_cos_axis_top": [["t0", 0.9487], ["t2", 0.0], ["t1", -0.9487]],
    "traits_cos_axis_bottom": [["t1", -0.9487], ["t2", 0.0], ["t0", 0.9487]],
    "traits_cos_pc1_top": [["t0", 0.9487], ["t2", 0.0], ["t1", -0.9487]],
    "traits_cos_pc1_bottom": [["t1", -0.9487], ["t2", 0.0], ["t0", 0.9487]],
}


def test_run_analysis_json_has_the_persona_space_file_structure() -> None:
    written = tiny_run_analysis().to_json()
    assert list(written) == list(PERSONA_SPACE_JSON)  # the file's key order
    assert rounded(written) == PERSONA_SPACE_JSON
    assert json.loads(json.dumps(written)) == written  # plain JSON types only: nothing changes on the way


def test_run_analysis_reads_back_from_its_json() -> None:
    analysis = tiny_run_analysis()
    back = RunAnalysis.from_json(json.loads(json.dumps(analysis.to_json())))
    assert back == analysis and back.to_json() == analysis.to_json()
    ends = back.trait_ends()
    assert ends is not None and ends.axis_top[0] == ("t0", 0.9487)
    bare = RunAnalysis(analysis.space)  # no run extras: no traits, no unjudged comparison
    assert RunAnalysis.from_json(bare.to_json()) == bare and bare.trait_ends() is None
    assert "trait_alignment" not in bare.to_json() and "cos_axis_pc1_all_answers" not in bare.to_json()
    space_only = analysis.space.to_json()
    assert "pc2_loadings" in space_only and PersonaSpaceAnalysis.from_json(space_only) == analysis.space
    with pytest.raises(PersonaAxisError, match="lacks cos_axis_pc1"):
        RunAnalysis.from_json({k: v for k, v in analysis.to_json().items() if k != "cos_axis_pc1"})


def test_a_zero_axis_layer_is_named() -> None:
    roles, axis, _, _ = synthetic()
    axis[2] = 0.0
    with pytest.raises(PersonaAxisError, match="the axis at layer 2 is all zeros"):
        analyze_persona_space(roles, axis, layer=2)
