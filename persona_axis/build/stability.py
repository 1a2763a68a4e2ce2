"""How far two runs of one model agree: the numbers that tell whether a run's figures are signal.

Two runs that differ only in their seed (or judge, or preset) should find the same axis, the same
PC1 and the same roles at its ends. `compare_runs` measures that from two finished run directories:
per layer, cos(axis A, axis B) and |cos(PC1 A, PC1 B)| (a PC1's sign is arbitrary); at the analysis
layer (the middle one unless told, as `persona-axis analyze` chooses it), each run's cos(axis, PC1)
and, over the roles both runs kept, the Spearman correlation of their axis projections and of their
PC1 loadings and how many roles the two runs share at each end of those rankings.
PC1 is computed in the activations' own coordinates (no standardising), in float64.

`split_half` reports the same figures within one run: its default and role rollouts are split by
question (the plan's questions with an even index make half A, those with an odd index half B; every
sample of a question goes with it), and each half's default vector, role vectors and axis are rebuilt
from its own answers as the run's vectors step builds them: the run's judge, the run's activations,
a role kept when it has at least ceil(min_score3 / 2) score-3 answers in the half. Each half has half
the answers, so the halves' agreement understates that of the full run (and of two full runs).
Both forms compare two in-memory sides (`RunVectors`) with `compare`, one code path for the figures.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from persona_axis.axis import Axis, compute_axis, cosine_per_layer, load_axis
from persona_axis.build.persona_space import analyze_persona_space, pca
from persona_axis.build.pipeline import accumulate_vectors
from persona_axis.catalog import DEFAULT_ROLE
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index
from persona_axis.store import RunLayout, RunStore, load_tensors, rollout_kind
from persona_axis.vectors import cosine

DEFAULT_ENDS = 10  # roles compared at each end of a ranking (fewer when the runs share fewer than twice this)
MIN_SHARED_ROLES = 3


@dataclass(frozen=True)
class RunVectors:
    """One side of a comparison, a whole run or half of one: its model (name and weights hash), axis and kept
    role vectors, and what they were built from.

    questions: the questions its default and role rollouts answer (0 when a run's manifest does not list them);
    n_default: the default-Assistant replies in its default vector; n_answers: the score-3 role answers in its
    kept role vectors; record_ids: the rollouts a split half was built from (empty for a whole run).
    """

    label: str
    model: str
    model_hash: str
    axis: Axis
    roles: dict[str, Tensor]  # name -> [layers, hidden]
    questions: int
    n_default: int
    n_answers: int
    record_ids: frozenset[str] = frozenset()


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
    """Agreement of run A and run B, or of the two halves of one run (see the module docstring); per-layer lists are [layers].

    cos_axis_pc1_a and _b are each side's |cos(axis, PC1)| per layer, as `analyze` reports them (unstandardised).
    split_half: A and B are the even- and odd-question halves of one run. questions_*, defaults_*, answers_*:
    the questions each side's rollouts answer, its default replies, and the score-3 role answers in its kept roles.
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
    split_half: bool
    questions_a: int
    questions_b: int
    defaults_a: int
    defaults_b: int
    answers_a: int
    answers_b: int
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
                f"built from: A {self.questions_a} questions, {self.defaults_a} default replies, {self.answers_a} score-3 "
                f"role answers; B {self.questions_b} questions, {self.defaults_b} default replies, {self.answers_b}"]
        if self.split_half:
            rows.append("split half: A and B are the halves of one run by question (even and odd plan index); each has "
                        "half the run's answers, so their agreement understates that of the full run")
        rows += ["layer  cos(axis A, axis B)  |cos(PC1 A, PC1 B)|  |cos(axis, PC1)| A  |cos(axis, PC1)| B"]
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


def _read_run(root: Path) -> tuple[RunVectors, dict[str, Any]]:
    """A finished run's model identity, axis and kept role vectors, and its vectors step's summary;
    a one-line error when a file is missing."""
    layout = RunLayout(root)
    vectors_path = layout.require_vectors("stability")
    if not layout.axis.is_file():
        raise PersonaAxisError(f"stability needs {layout.axis}, which is not there: finish the run first "
                               "(`persona-axis run` writes it at its axis step)")
    tensors, meta = load_tensors(vectors_path)
    if "summary" not in meta:
        raise PersonaAxisError(f"{vectors_path} does not say which roles the run kept (no summary): "
                               "recompute it with `persona-axis run`")
    summary = json.loads(meta["summary"])
    kept = summary["roles_used"]
    if any(name not in tensors for name in kept):
        raise PersonaAxisError(f"{vectors_path} lacks the role vectors its summary lists (a built-in axis ships only "
                               "the default vector): give the run directory itself")
    manifest = RunStore(root).read_manifest()
    identity, listed = manifest.get("identity", {}), manifest.get("questions", {})
    run = RunVectors(str(root), str(identity.get("model", "")), str(identity.get("model_hash", "")), load_axis(layout.axis),
                     {name: tensors[name] for name in kept},
                     questions=len({*listed.get("default", []), *listed.get("role", [])}),
                     n_default=int(summary.get("n_default", 0)), n_answers=sum(summary.get("score3_counts", {}).values()))
    return run, summary


class _HalfStore(RunStore):
    """A run's store showing only some of its rollouts and their scores: `accumulate_vectors` skips the other rows."""

    def __init__(self, root: Path, rollouts: list[dict[str, Any]], scores: list[dict[str, Any]]) -> None:
        super().__init__(root)
        self._shown = {"rollouts": rollouts, "scores": scores}

    def records(self, name: str) -> list[dict[str, Any]]:
        return self._shown[name] if name in self._shown else super().records(name)


def _question_order(manifest: dict[str, Any], rollouts: list[dict[str, Any]]) -> list[str]:
    """The questions the default and role rollouts answer, in plan order (as the manifest lists them; a run whose
    manifest does not: in the order the records first name them)."""
    listed = manifest.get("questions", {})
    return list(dict.fromkeys([*listed.get("default", []), *listed.get("role", []),
                               *(r["question_id"] for r in rollouts)]))


def _half(root: Path, whole: RunVectors, summary: dict[str, Any], rollouts: list[dict[str, Any]],
          scores: list[dict[str, Any]], questions: list[str], label: str) -> RunVectors:
    """One half of a run: its default vector, kept role vectors and axis from the rollouts answering `questions`."""
    asked = set(questions)
    mine = [r for r in rollouts if r["question_id"] in asked]
    ids = frozenset(r["id"] for r in mine)
    judge, need = summary["judge"], math.ceil(summary["min_score3"] / 2)
    sums, counts = accumulate_vectors(_HalfStore(root, mine, [r for r in scores if r["id"] in ids]), {"role": judge})
    where = f"the {label} half of {root} ({len(questions)} of its questions)"
    if DEFAULT_ROLE not in sums["roles"]:
        raise PersonaAxisError(f"{where} has no default-Assistant replies with activations: the run is incomplete")
    candidates = [*summary["roles_used"], *summary["roles_dropped"]]
    kept = {name: (sums["roles"][name] / counts["roles"][name]).float()
            for name in candidates if counts["roles"].get(name, 0) >= need}
    if len(kept) < MIN_SHARED_ROLES:
        raise PersonaAxisError(f"{where} keeps {len(kept)} roles with at least {need} score-3 answers from {judge}; "
                               f"a split half needs {MIN_SHARED_ROLES} in each half: run more questions or prompts")
    default = (sums["roles"][DEFAULT_ROLE] / counts["roles"][DEFAULT_ROLE]).float()
    return RunVectors(f"{root} {label}", whole.model, whole.model_hash,
                      Axis(compute_axis(default, torch.stack(list(kept.values())))), kept, questions=len(questions),
                      n_default=counts["roles"][DEFAULT_ROLE], n_answers=sum(counts["roles"][name] for name in kept),
                      record_ids=ids)


def split_halves(run: str | Path) -> tuple[RunVectors, RunVectors]:
    """The even- and odd-question halves of a finished run (see the module docstring), each rebuilt from its own
    default and role rollouts (trait rollouts are left out). An unfinished run, one whose rollouts answer fewer
    than 2 questions, or a half keeping fewer than MIN_SHARED_ROLES roles is a PersonaAxisError."""
    root = Path(run)
    whole, summary = _read_run(root)
    store = RunStore(root)
    rollouts = [r for r in store.records("rollouts") if rollout_kind(r) in ("default", "role")]
    questions = _question_order(store.read_manifest(), rollouts)
    if len(questions) < 2:
        raise PersonaAxisError(f"the default and role rollouts of {root} answer {len(questions)} question: a split half "
                               "needs at least 2 (a preset with more questions)")
    scores = store.records("scores")
    return (_half(root, whole, summary, rollouts, scores, questions[0::2], "even questions"),
            _half(root, whole, summary, rollouts, scores, questions[1::2], "odd questions"))


def _check_same_model(a: RunVectors, b: RunVectors) -> None:
    """Refuse runs of different models: different weights, or axes of different shapes."""
    if a.model_hash and b.model_hash and a.model_hash != b.model_hash:
        raise PersonaAxisError(f"{a.label} is a run of {a.model or 'one model'} and {b.label} of {b.model or 'another'} "
                               "(different weights): stability compares two runs of one model")
    shape_a, shape_b = tuple(a.axis.vectors.shape), tuple(b.axis.vectors.shape)
    if shape_a != shape_b:
        raise PersonaAxisError(f"{a.label} has an axis of shape {list(shape_a)} and {b.label} one of {list(shape_b)} "
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


def compare(a: RunVectors, b: RunVectors, layer: int | None = None, ends: int = DEFAULT_ENDS,
            split_half: bool = False) -> Stability:
    """Agreement of two sides of one model (see the module docstring); split_half marks them as halves of one run.

    layer: where projections, loadings and their rankings are compared (default: the middle layer,
    layers // 2). ends: roles compared at each end, at most half the shared roles. Sides of different
    models or fewer than MIN_SHARED_ROLES roles kept by both are a PersonaAxisError.
    """
    if ends < 1:
        raise PersonaAxisError(f"ends must be at least 1 role; got {ends}")
    _check_same_model(a, b)
    index = check_layer_index(a.axis.layer_or_middle(layer), a.axis.n_layers, "layer")
    shared = sorted(set(a.roles) & set(b.roles))
    if len(shared) < MIN_SHARED_ROLES:
        hint = "the run needs more questions or prompts" if split_half else "run both with the same roles"
        raise PersonaAxisError(f"{a.label} and {b.label} kept {len(shared)} roles in common; stability needs at least "
                               f"{MIN_SHARED_ROLES}: {hint}")
    space_a = analyze_persona_space(a.roles, a.axis.vectors, index)
    space_b = analyze_persona_space(b.roles, b.axis.vectors, index)
    pc1_cos = cosine_per_layer(_pc1_directions(a.roles), _pc1_directions(b.roles)).abs()
    n = min(ends, len(shared) // 2)
    return Stability(
        run_a=a.label, run_b=b.label, model_a=a.model, model_b=b.model,
        layers=a.axis.n_layers, hidden=a.axis.hidden_size, layer=index,
        axis_cos=cosine_per_layer(a.axis.vectors, b.axis.vectors).tolist(), pc1_abs_cos=pc1_cos.tolist(),
        cos_axis_pc1_a=list(space_a.cos_axis_pc1), cos_axis_pc1_b=list(space_b.cos_axis_pc1),
        roles_a=len(a.roles), roles_b=len(b.roles), roles_shared=len(shared), split_half=split_half,
        questions_a=a.questions, questions_b=b.questions, defaults_a=a.n_default, defaults_b=b.n_default,
        answers_a=a.n_answers, answers_b=b.n_answers,
        axis_projection=_agreement(space_a.axis_projection, space_b.axis_projection, shared, n, "axis projections"),
        pc1_loading=_agreement(space_a.pc1_loadings, space_b.pc1_loadings, shared, n, "PC1 loadings"),
    )


def compare_runs(run_a: str | Path, run_b: str | Path, layer: int | None = None, ends: int = DEFAULT_ENDS) -> Stability:
    """Agreement of two finished runs of one model (see `compare`); a missing axis or vectors file is a PersonaAxisError."""
    return compare(_read_run(Path(run_a))[0], _read_run(Path(run_b))[0], layer, ends)


def split_half(run: str | Path, layer: int | None = None, ends: int = DEFAULT_ENDS) -> Stability:
    """Agreement of the even- and odd-question halves of one finished run (see `split_halves` and `compare`)."""
    if ends < 1:
        raise PersonaAxisError(f"ends must be at least 1 role; got {ends}")
    return compare(*split_halves(run), layer, ends, split_half=True)
