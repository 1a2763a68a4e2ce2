"""Sweeps on a tiny random model: capping experiments and steering coefficients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_capping import make_run

from persona_axis.axis import Axis
from persona_axis.catalog import load_catalog, role_play_conversations
from persona_axis.control.capping import parse_layer_block
from persona_axis.control.spec import default_norms
from persona_axis.control.sweeps import SweepRow, candidate_blocks, pareto_front, steer_sweep, sweep
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import LoadedModel


def test_sweep_and_pareto_front(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    axis = make_run(tmp_path, layers=3, hidden=64, spread=1000.0)  # floors far below / above any real state
    axis = Axis(axis.vectors[:1].repeat(3, 1), axis.metadata)
    conversations = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Name a colour."}]]
    rows = sweep(tiny_llama, axis, tmp_path, [range(0, 2), range(1, 3)], [0.02, 0.98], conversations,
                 conversations[:1], max_new_tokens=4)
    assert [r.id for r in rows] == ["layers_0:2-p0.02", "layers_0:2-p0.98", "layers_1:3-p0.02", "layers_1:3-p0.98"]
    assert all(math.isfinite(r.role_shift) and math.isfinite(r.default_kl) and r.default_kl >= -1e-6
               for r in rows)
    # read outside the capped block: after it, or before it when the block ends at the last layer
    assert [r.measured_layer for r in rows] == [2, 2, 0, 0]
    low, high = rows[0], rows[1]
    assert abs(low.role_shift) < 1e-3 and low.default_kl < 1e-6  # a floor below everything changes nothing
    assert high.role_shift > 100 and high.default_kl > low.default_kl  # the raised residual carries on

    front = pareto_front([SweepRow("a", 0, 1.0, 0.1), SweepRow("b", 0, 2.0, 0.1), SweepRow("c", 0, 3.0, 0.5),
                          SweepRow("d", 0, 0.5, 0.0), SweepRow("e", 0, 3.0, 0.5)])
    assert [r.id for r in front] == ["b", "c", "d", "e"]
    best = max(rows, key=lambda r: r.role_shift)
    assert best in pareto_front(rows) and all(r in rows for r in pareto_front(rows))


class LengthJudge:
    """A deterministic stand-in judge: score 3 for replies of 10+ characters, else 1."""

    id = "length"

    def score(self, items: list[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if len(i.response) >= 10 else 1, "length", self.id) for i in items]


def test_steer_sweep_reports_scores_and_projection_moves_with_coef(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(0)
    axis = Axis(torch.randn(1, 64).repeat(3, 1))  # one direction at every layer: the addition carries downstream
    report = steer_sweep(tiny_llama, axis, load_catalog(), LengthJudge(), layer=0, coefs=[-20.0, 0.0, 20.0],
                         n_roles=3, n_questions=1, max_new_tokens=4)
    assert (report.layer, report.measured_layer) == (0, 1)  # middle layer 1, downstream of the steered 0
    assert report.unit_length == pytest.approx(float(axis.vectors[0].norm()), abs=1e-3)
    rows = report.rows
    assert [r.coef for r in rows] == [-20.0, 0.0, 20.0]
    assert all(sum(r.scores.values()) == r.n == 3 for r in rows)
    projections = [r.mean_projection for r in rows]
    assert projections[0] < projections[1] < projections[2]  # the residual stream carries the addition to layer 1
    assert len(role_play_conversations(load_catalog(), 4, 2)) == 8


class ScriptedJudge:
    """Gives each call's replies the next list of scores (None: unscored), whatever they say."""

    id = "scripted"

    def __init__(self, calls: list[list[int | None]]) -> None:
        self.calls = list(calls)

    def score(self, items: list[JudgeItem]) -> list[Verdict]:
        scores = self.calls.pop(0)
        assert len(scores) == len(items)
        return [Verdict(s, "scripted", self.id) for s in scores]


def test_steer_sweep_share_in_role_and_its_change_from_coef_zero(tiny_llama: LoadedModel) -> None:
    axis = Axis(torch.ones(3, 64))
    judge = ScriptedJudge([[3, 3, None, 1], [3, 1, 1, 1], [1, 1, 1, 1]])
    away, zero, toward = steer_sweep(tiny_llama, axis, load_catalog(), judge, layer=1, coefs=[-1.0, 0.0, 1.0],
                                     n_roles=2, n_questions=2, max_new_tokens=2).rows
    assert away.in_role.value == pytest.approx(2 / 3)  # the unscored reply is left out
    assert zero.in_role.value == pytest.approx(1 / 4) and toward.in_role.value == 0.0
    assert away.in_role.low is not None and away.in_role.high is not None
    assert away.in_role.low <= 2 / 3 <= away.in_role.high
    assert zero.in_role_change is None
    assert away.in_role_change is not None and toward.in_role_change is not None
    assert away.in_role_change.value == pytest.approx(2 / 3 - 1 / 4)
    assert toward.in_role_change.value == pytest.approx(-1 / 4)
    [row] = steer_sweep(tiny_llama, axis, load_catalog(), ScriptedJudge([[None, None]]), layer=1, coefs=[1.0],
                        n_roles=2, n_questions=1, max_new_tokens=2).rows
    assert row.in_role.value is None and row.in_role_change is None and row.mean_score is None  # nothing scored


def test_steer_sweep_never_reads_the_steered_layer(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(1)
    v = torch.randn(3, 64)
    axis = Axis(0.01 * v / v.norm(dim=-1, keepdim=True))  # small enough to leave the greedy tokens unchanged
    report = steer_sweep(tiny_llama, axis, load_catalog(), LengthJudge(), layer=1, coefs=[0.0, 1.0],
                         n_roles=2, n_questions=1, max_new_tokens=4)
    assert report.measured_layer != report.layer == 1
    moved = report.rows[1].mean_projection - report.rows[0].mean_projection
    assert abs(moved - 0.01) > 1e-3  # read at the steered layer it moves by exactly coef·‖axis‖ = 0.01
    assert abs(moved) < 1e-6  # upstream of the steering, the same tokens give the same activations
    with pytest.raises(PersonaAxisError, match="steered layer -1 is out of range"):
        steer_sweep(tiny_llama, axis, load_catalog(), LengthJudge(), layer=-1, coefs=[0.0])


def test_relative_steer_sweep_scales_by_the_default_norm(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    axis = make_run(tmp_path, layers=3, hidden=64)
    norms = default_norms(tmp_path)
    report = steer_sweep(tiny_llama, axis, load_catalog(), LengthJudge(), layer=2, coefs=[0.0], n_roles=1,
                         n_questions=1, max_new_tokens=2, norms=norms)
    assert report.measured_layer == 1
    assert report.unit_length == pytest.approx(float(norms[2]), abs=1e-3) != pytest.approx(
        float(axis.vectors[2].norm()), abs=1e-3)


def test_candidate_blocks_and_layer_blocks() -> None:
    assert candidate_blocks(30) == [range(14, 19), range(21, 26), range(25, 30)]  # the last one clipped to the model
    assert candidate_blocks(3) == [range(1, 2), range(2, 3)]
    assert parse_layer_block(" 21:26 ") == range(21, 26)
    for bad in ("3:1", "2:2", "-1:4", "a:b", "21-26", "layers_21:26"):
        with pytest.raises(PersonaAxisError, match="bad layer block"):
            parse_layer_block(bad)
