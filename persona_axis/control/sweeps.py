"""Sweeps that help choose a setting: capping experiments (layer blocks x percentiles) and steering coefficients.

`sweep` scores capping experiments by how far they move role-play replies toward the Assistant end
versus how much they perturb default-Assistant next-token distributions; `pareto_front` keeps
the experiments nothing beats on both. `steer_sweep` adds the axis at one layer with several
coefficients and reports the judge's role-adherence distribution and the mean projection.
Every projection is read at a layer no intervention touches (see persona_axis.measurement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis
from persona_axis.catalog import Catalog, role_play_conversations
from persona_axis.control.calibration import calibrate
from persona_axis.control.capping import Experiment, default_layer_block, experiment_id
from persona_axis.control.spec import steering_vector
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Addition
from persona_axis.errors import PersonaAxisError
from persona_axis.evals.capabilities import next_token_kl
from persona_axis.evals.stats import Estimate, bootstrap_rate, rate_difference
from persona_axis.judges.base import Judge, JudgeItem
from persona_axis.measurement import check_layer_index, layer_after_block, measured_layer
from persona_axis.model.loading import LoadedModel, Message


@dataclass(frozen=True)
class SweepRow:
    """One capping experiment of a `sweep`: where its effect was read, and its two scores (see `sweep`)."""

    id: str
    measured_layer: int
    role_shift: float
    default_kl: float

    def to_json(self) -> dict[str, str | int | float]:
        """{"id", "measured_layer", "role_shift", "default_kl"}."""
        return asdict(self)

    def dominates(self, other: SweepRow) -> bool:
        """At least as good as `other` on both scores (higher role_shift, lower default_kl) and better on one."""
        return (self.role_shift >= other.role_shift and self.default_kl <= other.default_kl
                and (self.role_shift > other.role_shift or self.default_kl < other.default_kl))


@dataclass(frozen=True)
class SteerRow:
    """One coefficient of a `steer_sweep`: the judge's score counts ("0".."3", "unscored") over n replies,
    their mean score (None when none was scored), the replies' mean projection on the unit axis, the share
    of scored replies in role (score 3) with a 95 % interval from resampling roles (a role's replies are
    not independent), and that share minus the share at coef 0 on the same prompts, resampled by role
    (None at coef 0 itself and when 0 is not among the coefs)."""

    coef: float
    n: int
    scores: dict[str, int]
    mean_score: float | None
    mean_projection: float
    in_role: Estimate
    in_role_change: Estimate | None


@dataclass(frozen=True)
class SteerSweep:
    """A `steer_sweep`: the steered layer, the layer projections were read at, ‖v‖, and one row per coef."""

    layer: int
    measured_layer: int
    unit_length: float
    rows: list[SteerRow]

    def to_json(self) -> dict[str, object]:
        """{"layer", "measured_layer", "unit_length", "rows": [{"coef", "n", "scores", "mean_score", "mean_projection",
        "in_role": {"value", "low", "high"}, "in_role_change": {...} | None}]}."""
        return asdict(self)


def candidate_blocks(n_layers: int) -> list[range]:
    """The blocks a sweep tries by default: `default_layer_block` and the same-size blocks a quarter
    of the model earlier and later (clipped to the model; duplicates dropped), in layer order."""
    block = default_layer_block(n_layers)
    shift = max(1, n_layers // 4)
    starts = sorted({max(0, block.start - shift), block.start, min(n_layers - len(block), block.start + shift)})
    return [range(s, s + len(block)) for s in starts]


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
) -> list[SweepRow]:
    """Measure each (block, percentile) experiment calibrated from the run; one row per experiment.

    role_shift: mean over role-play conversations of (capped − uncapped) projection of the reply's
    mean activation on the unit axis at `measured_layer`, outside the capped block: block.stop
    when the model has that layer, else block.start − 1 (`layer_after_block`). default_kl: mean
    over every position of the default prompts + their uncapped replies (teacher-forced) of
    KL(uncapped ‖ capped) of the next-token distributions, in nats.
    """
    if not role_conversations or not default_conversations:
        raise PersonaAxisError("a sweep needs at least one role-play and one default conversation")
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    config = calibrate(run_dir, blocks, percentiles, axis=axis)
    config.check_model(lm)
    plan = [(config.experiment(experiment_id(b.start, b.stop, p)), layer_after_block(b, lm.n_layers))
            for b in blocks for p in percentiles]
    shifts = _role_shifts(lm, axis, plan, role_conversations, max_new_tokens, progress)
    kls = [r.kl for r in next_token_kl(lm, default_conversations, [e.interventions() for e, _ in plan], max_new_tokens)]
    return [SweepRow(e.id, layer, s, k) for (e, layer), s, k in zip(plan, shifts, kls)]


def _role_shifts(lm: LoadedModel, axis: Axis, plan: list[tuple[Experiment, int]],
                 conversations: Sequence[list[Message]], max_new_tokens: int, progress: bool) -> list[float]:
    """Per (experiment, measured layer): mean capped − uncapped projection of the replies' mean activations."""
    measured = sorted({layer for _, layer in plan})
    base = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=measured).captured_means()
    base_proj = {layer: axis.project(base[:, k], layer) for k, layer in enumerate(measured)}
    shifts = []
    for experiment, layer in tqdm(plan, desc="sweep", unit="experiment", disable=not progress):
        capped = generate(lm, conversations, max_new_tokens=max_new_tokens, capture=[layer],
                          interventions=experiment.interventions()).captured_means()
        shifts.append(float((axis.project(capped[:, 0], layer) - base_proj[layer]).mean()))
    return shifts


def _in_role(scores: Sequence[int | None], roles: Sequence[str]) -> tuple[list[bool], list[str]]:
    """(score == 3 per scored reply, its role): unscored replies are left out."""
    kept = [(score == 3, role) for score, role in zip(scores, roles) if score is not None]
    return [k for k, _ in kept], [r for _, r in kept]


def _steer_row(coef: float, scores: Sequence[int | None], projection: float, roles: Sequence[str],
               zero: Sequence[int | None] | None) -> SteerRow:
    """A SteerRow from one coef's scores [n] (None: unscored), with the in-role change against `zero`'s scores."""
    counts = Counter("unscored" if s is None else str(s) for s in scores)
    scored = [s for s in scores if s is not None]
    in_role, clusters = _in_role(scores, roles)
    undefined = Estimate(None, None, None)
    share = bootstrap_rate(in_role, clusters) if in_role else undefined
    change = None
    if zero is not None:
        base, base_clusters = _in_role(zero, roles)
        change = rate_difference(in_role, base, clusters, base_clusters) if in_role and base else undefined
    return SteerRow(coef, len(scores), {k: counts.get(k, 0) for k in ("0", "1", "2", "3", "unscored")},
                    sum(scored) / len(scored) if scored else None, projection, share, change)


def pareto_front(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Rows no other row dominates (role_shift at least as high and default_kl at least as low, one strictly)."""
    return [row for row in rows if not any(other.dominates(row) for other in rows)]


def steer_sweep(lm: LoadedModel, axis: Axis, catalog: Catalog, judge: Judge, layer: int, coefs: Sequence[float],
                n_roles: int = 12, n_questions: int = 2, max_new_tokens: int = 48, progress: bool = False,
                *, norms: Tensor | None = None, measure_at: int | None = None) -> SteerSweep:
    """For each coef, add coef × v at `layer` while role-play prompts are answered; judge and project the replies.

    v is axis[layer], or with norms [layers] (see `spec.default_norms`) norms[layer] × the unit
    axis, so coefs are relative to the default activation norm. Projections are read at
    `measured_layer` (default: `measurement.measured_layer`'s choice, outside the steered layer).
    Each row holds the judge's score counts, the mean score, the mean projection of the replies'
    mean activation on the unit axis at the measured layer, and the share in role (score 3) with its
    change from coef 0 (see SteerRow): every coef answers the same n_roles × n_questions prompts.
    """
    layer = check_layer_index(layer, lm.n_layers, "steered layer")
    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    measured = measured_layer(axis, [layer], measure_at)
    vector = steering_vector(axis, layer, norms)
    pairs = role_play_conversations(catalog, n_roles, n_questions)
    descriptions = {r.name: r.description for r in catalog.roles}
    judged = []
    for coef in tqdm(coefs, desc="steer-sweep", unit="coef", disable=not progress):
        result = generate(lm, [c for _, c in pairs], max_new_tokens=max_new_tokens, capture=[measured],
                          interventions={layer: Addition(vector, coef)} if coef else {})
        verdicts = judge.score([JudgeItem(name, descriptions[name], c[-1]["content"], text)
                                for (name, c), text in zip(pairs, result.texts)])
        judged.append(([v.score for v in verdicts],
                       float(axis.project(result.captured_means()[:, 0], measured).mean())))
    roles = [name for name, _ in pairs]
    zero = next((scores for coef, (scores, _) in zip(coefs, judged) if coef == 0), None)
    rows = [_steer_row(coef, scores, projection, roles, None if coef == 0 else zero)
            for coef, (scores, projection) in zip(coefs, judged)]
    return SteerSweep(layer, measured, float(vector.norm()), rows)
