"""Sweeps that help choose a setting: capping experiments (layer blocks x percentiles) and steering coefficients.

`sweep` scores capping experiments by how far they move role-play replies toward the Assistant end
versus how much they perturb default-Assistant next-token distributions; `pareto_front` keeps
the experiments nothing beats on both. `steer_sweep` adds the axis at one layer with several
coefficients and reports the judge's role-adherence distribution and the mean projection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis
from persona_axis.capping import Experiment, calibrate, experiment_id
from persona_axis.catalog import Catalog
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.judges.base import Judge, JudgeItem
from persona_axis.models import LoadedModel, Message
from persona_axis.steering import Addition, steer


@torch.inference_mode()
def _log_probs(lm: LoadedModel, ids: Tensor) -> Tensor:
    """Next-token log-probabilities [seq, vocab] float32 of one token sequence ids [seq]."""
    return lm.model(input_ids=ids[None].to(lm.device)).logits[0].float().log_softmax(-1)


def sweep(
    lm: LoadedModel,
    axis: Axis,
    run_dir: str | Path,
    blocks: Sequence[range],
    percentiles: Sequence[float],
    role_conversations: Sequence[list[Message]],
    default_conversations: Sequence[list[Message]],
    max_new_tokens: int = 32,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Measure each (block, percentile) experiment calibrated from the run; one row per experiment.

    role_shift: mean over role-play conversations of (capped − uncapped) projection of the reply's
    mean activation on the unit axis at layer min(block.stop, n_layers − 1). default_kl: mean over
    every position of the default prompts + their uncapped replies (teacher-forced) of
    KL(uncapped ‖ capped) of the next-token distributions, in nats.
    """
    if not role_conversations or not default_conversations:
        raise PersonaAxisError("a sweep needs at least one role-play and one default conversation")
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    config = calibrate(run_dir, blocks, percentiles, axis=axis)
    config.check_model(lm)
    plan = [(config.experiment(experiment_id(b.start, b.stop, p)), min(b.stop, lm.n_layers - 1))
            for b in blocks for p in percentiles]
    shifts = _role_shifts(lm, axis, plan, role_conversations, max_new_tokens, progress)
    kls = _default_kls(lm, [e for e, _ in plan], default_conversations, max_new_tokens)
    return [{"id": e.id, "role_shift": s, "default_kl": k} for (e, _), s, k in zip(plan, shifts, kls)]


def _role_shifts(lm: LoadedModel, axis: Axis, plan: list[tuple[Experiment, int]],
                 conversations: Sequence[list[Message]], max_new_tokens: int, progress: bool) -> list[float]:
    """Per (experiment, measured layer): mean capped − uncapped projection of the replies' mean activations."""
    measured = sorted({layer for _, layer in plan})
    base = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=measured)
    assert base.means is not None
    base_proj = {layer: axis.project(base.means[:, k], layer) for k, layer in enumerate(measured)}
    shifts = []
    for experiment, layer in tqdm(plan, desc="sweep", unit="experiment", disable=not progress):
        capped = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=[layer],
                          interventions=experiment.interventions())
        assert capped.means is not None
        shifts.append(float((axis.project(capped.means[:, 0], layer) - base_proj[layer]).mean()))
    return shifts


def _default_kls(lm: LoadedModel, experiments: list[Experiment], conversations: Sequence[list[Message]],
                 max_new_tokens: int) -> list[float]:
    """Per experiment: KL(uncapped ‖ capped) in nats, averaged over every position of prompt + uncapped reply."""
    replies = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=False)
    totals, positions = [0.0] * len(experiments), 0
    for conversation, reply in zip(conversations, replies.token_ids):
        ids = torch.tensor(lm.tokenizer(lm.chat_prompt(list(conversation)), add_special_tokens=False).input_ids + reply)
        plain = _log_probs(lm, ids)
        positions += len(ids)
        for k, experiment in enumerate(experiments):
            with steer(lm, experiment.interventions()):
                totals[k] += float((plain.exp() * (plain - _log_probs(lm, ids))).sum())
    return [total / positions for total in totals]


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row dominates (role_shift at least as high and default_kl at least as low, one strictly)."""
    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return (a["role_shift"] >= b["role_shift"] and a["default_kl"] <= b["default_kl"]
                and (a["role_shift"] > b["role_shift"] or a["default_kl"] < b["default_kl"]))

    return [row for row in rows if not any(dominates(other, row) for other in rows)]


def role_play_conversations(catalog: Catalog, n_roles: int, n_questions: int) -> list[tuple[str, list[Message]]]:
    """(role name, conversation) pairs: an even spread of `n_roles` roles over the catalogue, first prompt each."""
    step = max(1, len(catalog.roles) // max(1, n_roles))
    roles = catalog.roles[::step][:n_roles]
    return [(role.name, [{"role": "system", "content": role.prompts[0]}, {"role": "user", "content": q.text}])
            for role in roles for q in catalog.questions[:n_questions]]


def steer_sweep(lm: LoadedModel, axis: Axis, catalog: Catalog, judge: Judge, layer: int, coefs: Sequence[float],
                n_roles: int = 12, n_questions: int = 2, max_new_tokens: int = 48,
                progress: bool = False) -> list[dict[str, Any]]:
    """For each coef, add coef x axis[layer] while role-play prompts are answered; judge and project the replies.

    Returns per coef: the judge's score counts ("0".."3", "unscored"), the mean score, and the mean
    projection of the replies' mean activation on the unit axis at `layer`.
    """
    layer = lm.check_layer(layer)
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    pairs = role_play_conversations(catalog, n_roles, n_questions)
    descriptions = {r.name: r.description for r in catalog.roles}
    rows = []
    for coef in tqdm(coefs, desc="steer-sweep", unit="coef", disable=not progress):
        result = generate(lm, [c for _, c in pairs], max_new_tokens=max_new_tokens, capture=[layer],
                          interventions={layer: Addition(axis.vectors[layer], coef)} if coef else {})
        assert result.means is not None
        verdicts = judge.score([JudgeItem(name, descriptions[name], c[-1]["content"], text)
                                for (name, c), text in zip(pairs, result.texts)])
        counts = Counter("unscored" if v.score is None else str(v.score) for v in verdicts)
        scored = [v.score for v in verdicts if v.score is not None]
        rows.append({"coef": coef, "n": len(pairs),
                     "scores": {k: counts.get(k, 0) for k in ("0", "1", "2", "3", "unscored")},
                     "mean_score": round(sum(scored) / len(scored), 3) if scored else None,
                     "mean_projection": round(float(axis.project(result.means[:, 0], layer).mean()), 3)})
    return rows
