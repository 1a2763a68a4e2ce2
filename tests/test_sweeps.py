"""Sweeps on a tiny random model: capping experiments and steering coefficients."""

from __future__ import annotations

import math
from pathlib import Path

from test_capping import make_run

from persona_axis.axis import Axis
from persona_axis.catalog import load_catalog
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.models import LoadedModel
from persona_axis.sweeps import pareto_front, role_play_conversations, steer_sweep, sweep


def test_sweep_and_pareto_front(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    axis = make_run(tmp_path, layers=3, hidden=64, spread=1000.0)  # floors far below / above any real state
    axis = Axis(axis.vectors[:1].repeat(3, 1), axis.metadata)
    conversations = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Name a colour."}]]
    rows = sweep(tiny_llama, axis, tmp_path, [range(0, 2), range(1, 3)], [0.02, 0.98], conversations,
                 conversations[:1], max_new_tokens=4)
    assert [r["id"] for r in rows] == ["layers_0:2-p0.02", "layers_0:2-p0.98", "layers_1:3-p0.02", "layers_1:3-p0.98"]
    assert all(math.isfinite(r["role_shift"]) and math.isfinite(r["default_kl"]) and r["default_kl"] >= -1e-6
               for r in rows)
    low, high = rows[2], rows[3]
    assert abs(low["role_shift"]) < 1e-3 and low["default_kl"] < 1e-6  # a floor below everything changes nothing
    assert high["role_shift"] > 100 and high["default_kl"] > low["default_kl"]

    front = pareto_front([{"id": "a", "role_shift": 1.0, "default_kl": 0.1}, {"id": "b", "role_shift": 2.0, "default_kl": 0.1},
                          {"id": "c", "role_shift": 3.0, "default_kl": 0.5}, {"id": "d", "role_shift": 0.5, "default_kl": 0.0},
                          {"id": "e", "role_shift": 3.0, "default_kl": 0.5}])
    assert [r["id"] for r in front] == ["b", "c", "d", "e"]
    best = max(rows, key=lambda r: r["role_shift"])
    assert best in pareto_front(rows) and all(r in rows for r in pareto_front(rows))


class LengthJudge:
    """A deterministic stand-in judge: score 3 for replies of 10+ characters, else 1."""

    id = "length"

    def score(self, items: list[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if len(i.response) >= 10 else 1, "length", self.id) for i in items]


def test_steer_sweep_reports_scores_and_projection_moves_with_coef(tiny_llama: LoadedModel) -> None:
    import torch

    torch.manual_seed(0)
    axis = Axis(torch.randn(3, 64))
    rows = steer_sweep(tiny_llama, axis, load_catalog(), LengthJudge(), layer=1, coefs=[-20.0, 0.0, 20.0],
                       n_roles=3, n_questions=1, max_new_tokens=4)
    assert [r["coef"] for r in rows] == [-20.0, 0.0, 20.0]
    assert all(sum(r["scores"].values()) == r["n"] == 3 for r in rows)
    projections = [r["mean_projection"] for r in rows]
    assert projections[0] < projections[1] < projections[2]  # adding the axis raises the projection at that layer
    assert len(role_play_conversations(load_catalog(), 4, 2)) == 8
