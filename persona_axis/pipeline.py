"""The Assistant Axis pipeline over a run directory: rollouts → scores → vectors → axis → analysis.

Every step reads what is on disk and does only what is missing, so a killed run resumes where it
stopped. Rollouts are generated in fixed chunks of the plan (chunk k is always the same items,
seeded with seed + k), so a resumed run produces exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from persona_axis.axis import Axis, axis_metadata, compute_axis, save_axis
from persona_axis.catalog import DEFAULT_ROLE, Catalog, Role
from persona_axis.errors import PersonaAxisError
from persona_axis.generation import generate
from persona_axis.judges.base import Judge, JudgeItem
from persona_axis.models import LoadedModel
from persona_axis.store import RunStore, load_tensors


@dataclass(frozen=True)
class Settings:
    """What a run generates. roles_per_group=None means every role; default_prompts=None every default prompt."""

    prompts_per_role: int
    questions: int
    default_questions: int
    max_new_tokens: int
    min_score3: int
    roles_per_group: int | None = None
    default_prompts: int | None = None
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64


PRESETS: dict[str, Settings] = {
    # CI-sized: 2 roles per group, a handful of short answers; well under 3 minutes on 2 cores.
    "smoke": Settings(prompts_per_role=1, questions=3, default_questions=4, max_new_tokens=24, min_score3=1,
                      roles_per_group=2, default_prompts=3, batch_size=16),
    # Every role, once or twice: minutes on 2 cores; the README's main command.
    "quick": Settings(prompts_per_role=1, questions=2, default_questions=8, max_new_tokens=48, min_score3=1),
    # Every role with enough answers for stable vectors: under an hour on 2 cores.
    "standard": Settings(prompts_per_role=3, questions=12, default_questions=40, max_new_tokens=64, min_score3=3),
    # The full design: 5 prompts x 240 questions for every role (days on a CPU; meant for a GPU).
    "paper": Settings(prompts_per_role=5, questions=240, default_questions=240, max_new_tokens=256, min_score3=10),
}


@dataclass(frozen=True)
class PlanItem:
    id: str
    role: str
    prompt_index: int
    question_id: str
    system: str
    question: str


def select_roles(catalog: Catalog, settings: Settings, names: list[str] | None) -> tuple[Role, ...]:
    """Roles a run covers: explicit names, else the first `roles_per_group` of each group, else all."""
    if names:
        return catalog.select_roles(names)
    if settings.roles_per_group is None:
        return catalog.roles
    taken: dict[str, int] = {}
    chosen = []
    for role in catalog.roles:
        if taken.get(role.group, 0) < settings.roles_per_group:
            taken[role.group] = taken.get(role.group, 0) + 1
            chosen.append(role)
    return tuple(chosen)


def plan_rollouts(catalog: Catalog, settings: Settings, roles: tuple[Role, ...]) -> list[PlanItem]:
    """Every (system prompt, question) pair to generate: default-Assistant prompts first, then each role."""
    plan = []
    defaults = catalog.defaults[: settings.default_prompts] if settings.default_prompts else catalog.defaults
    for p, system in enumerate(defaults):
        for q in catalog.questions[: settings.default_questions]:
            plan.append(PlanItem(f"{DEFAULT_ROLE}|p{p}|{q.id}", DEFAULT_ROLE, p, q.id, system, q.text))
    for role in roles:
        for p, system in enumerate(role.prompts[: settings.prompts_per_role]):
            for q in catalog.questions[: settings.questions]:
                plan.append(PlanItem(f"{role.name}|p{p}|{q.id}", role.name, p, q.id, system, q.text))
    return plan


def chunk_file(index: int) -> str:
    return f"activations/chunk-{index:05d}.safetensors"


def step_rollouts(store: RunStore, lm: LoadedModel, plan: list[PlanItem], settings: Settings, progress: bool) -> None:
    """Generate missing rollouts chunk by chunk; each chunk saves its activations, then appends its records."""
    done = {r["id"] for r in store.records("rollouts")}
    size = settings.batch_size
    bar = tqdm(total=len(plan), desc="rollouts", unit="reply", disable=not progress)
    for index, start in enumerate(range(0, len(plan), size)):
        chunk = plan[start : start + size]
        if store.has(chunk_file(index)) and all(item.id in done for item in chunk):
            bar.update(len(chunk))
            continue
        conversations = [
            [{"role": "system", "content": item.system}, {"role": "user", "content": item.question}] for item in chunk
        ]
        result = generate(lm, conversations, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          seed=settings.seed + index, batch_size=len(chunk))
        assert result.means is not None
        store.save_tensors(chunk_file(index), {"means": result.means}, {"ids": json.dumps([i.id for i in chunk])})
        store.append("rollouts", [
            {**asdict(item), "chunk": index, "response": text, "n_tokens": len(ids), "finished": fin}
            for item, text, ids, fin in zip(chunk, result.texts, result.token_ids, result.finished)
            if item.id not in done
        ])
        bar.update(len(chunk))
    bar.close()
    store.mark_step("rollouts", {"done": True, "n": len(plan)})


def step_scores(store: RunStore, judge: Judge, catalog: Catalog, progress: bool, batch: int = 64) -> None:
    """Judge every role rollout this judge has not scored yet (default-Assistant rollouts are not judged).

    Scores carry the judge's id, so switching judges re-judges the same rollouts without regenerating.
    """
    scored = {r["id"] for r in store.records("scores") if r["judge"] == judge.id}
    todo = [r for r in store.records("rollouts") if r["role"] != DEFAULT_ROLE and r["id"] not in scored]
    descriptions = {role.name: role.description for role in catalog.roles}
    bar = tqdm(total=len(todo), desc="judging", unit="reply", disable=not progress)
    for start in range(0, len(todo), batch):
        records = todo[start : start + batch]
        items = [JudgeItem(r["role"], descriptions.get(r["role"], ""), r["question"], r["response"]) for r in records]
        verdicts = judge.score(items)
        store.append("scores", [
            {"id": r["id"], "score": v.score, "judge": judge.id, "rationale": v.rationale}
            for r, v in zip(records, verdicts)
        ])
        bar.update(len(records))
    bar.close()
    store.mark_step("scores", {"done": True})


def step_vectors(store: RunStore, roles: tuple[Role, ...], judge_id: str, min_score3: int) -> dict[str, Any]:
    """Role vectors (mean of score-3 activations) and the default vector; roles short of score-3 answers are dropped."""
    role_of = {r["id"]: r["role"] for r in store.records("rollouts")}
    score_of = {r["id"]: r["score"] for r in store.records("scores") if r["judge"] == judge_id}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for path in sorted((store.root / "activations").glob("chunk-*.safetensors")):
        tensors, meta = load_tensors(path)
        for row, record_id in enumerate(json.loads(meta["ids"])):
            role = role_of.get(record_id)
            if role is None or (role != DEFAULT_ROLE and score_of.get(record_id) != 3):
                continue
            sums[role] = sums.get(role, 0) + tensors["means"][row].double()
            counts[role] = counts.get(role, 0) + 1
    if DEFAULT_ROLE not in sums:
        raise PersonaAxisError("no default-Assistant rollouts found: the rollouts step did not finish")
    used = [r.name for r in roles if counts.get(r.name, 0) >= min_score3]
    dropped = {r.name: counts.get(r.name, 0) for r in roles if r.name not in used}
    vectors = {name: (sums[name] / counts[name]).float() for name in [DEFAULT_ROLE, *used]}
    summary = {"roles_used": used, "roles_dropped": dropped, "score3_counts": {n: counts.get(n, 0) for n in used},
               "judge": judge_id,
               "n_default": counts[DEFAULT_ROLE], "min_score3": min_score3,
               "groups": {r.name: r.group for r in roles}}
    store.save_tensors("vectors.safetensors", vectors, {"summary": json.dumps(summary)})
    store.mark_step("vectors", {"done": True, "roles_used": len(used), "roles_dropped": len(dropped)})
    return summary


def step_axis(store: RunStore, lm: LoadedModel, used: list[str]) -> Axis:
    """axis = default vector − mean of role vectors, saved as axis.safetensors."""
    if not used:
        raise PersonaAxisError("every role was dropped (too few score-3 answers): lower --min-score3 or run more questions")
    tensors, _ = load_tensors(store.root / "vectors.safetensors")
    vectors = compute_axis(tensors[DEFAULT_ROLE], torch.stack([tensors[name] for name in used]))
    manifest_hash = hashlib.sha256(json.dumps(store.read_manifest()["identity"], sort_keys=True).encode()).hexdigest()
    axis = Axis(vectors, axis_metadata(lm.name, lm.source_hash, manifest_hash))
    save_axis(axis, store.root / "axis.safetensors")
    store.mark_step("axis", {"done": True})
    return axis


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["persona-axis", "torch", "transformers", "safetensors", "sentence-transformers"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), **found}


def run_pipeline(
    out: str | Path,
    lm: LoadedModel,
    catalog: Catalog,
    settings: Settings,
    judge: Judge,
    role_names: list[str] | None = None,
    preset: str = "custom",
    progress: bool = True,
) -> Path:
    """Run (or resume) every step into `out`; returns the run directory. Refuses a directory whose run differs."""
    roles = select_roles(catalog, settings, role_names)
    identity = {
        "model": lm.name, "model_hash": lm.source_hash, "dtype": str(lm.dtype).removeprefix("torch."),
        "catalog": catalog.digest(), "roles": sorted(r.name for r in roles), "settings": asdict(settings),
    }
    with RunStore.open(out) as store:
        store.claim(identity, {"preset": preset, "versions": _versions(), "catalog_source": catalog.source})
        step_rollouts(store, lm, plan_rollouts(catalog, settings, roles), settings, progress)
        step_scores(store, judge, catalog, progress)
        summary = step_vectors(store, roles, judge.id, settings.min_score3)
        step_axis(store, lm, summary["roles_used"])
    return Path(out)


def preset_settings(name: str, **overrides: Any) -> Settings:
    """A preset's settings with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise PersonaAxisError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def analyze_run(run_dir: str | Path, layer: int | None = None, standardise: bool = False) -> dict[str, Any]:
    """Persona-space analysis of a finished run; writes persona_space.json, figures/ and report.html."""
    from persona_axis.axis import load_axis
    from persona_axis.persona_space import analyze_persona_space
    from persona_axis.report import write_report

    root = Path(run_dir)
    if not (root / "vectors.safetensors").exists() or not (root / "axis.safetensors").exists():
        raise PersonaAxisError(f"{root} has no finished run (vectors and axis missing): run `persona-axis run` first")
    tensors, meta = load_tensors(root / "vectors.safetensors")
    summary = json.loads(meta["summary"])
    axis = load_axis(root)
    index = axis.layer_or_middle(layer)
    if not 0 <= index < axis.n_layers:
        raise PersonaAxisError(f"layer {index} is out of range: the axis has {axis.n_layers} layers")
    role_vectors = {name: tensors[name] for name in summary["roles_used"]}
    analysis = analyze_persona_space(role_vectors, axis.vectors, index, summary["groups"], standardise=standardise)
    analysis["roles_dropped"] = summary["roles_dropped"]
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "persona_space.json").write_text(json.dumps(analysis, indent=2))
    details = {"model": manifest["identity"]["model"], "preset": manifest.get("preset", ""),
               "judge": summary["judge"], "default rollouts": summary["n_default"],
               "min score-3 answers per role": summary["min_score3"], "roles_dropped": summary["roles_dropped"]}
    write_report(analysis, root, title=f"Persona space of {manifest['identity']['model']}", details=details)
    return analysis
