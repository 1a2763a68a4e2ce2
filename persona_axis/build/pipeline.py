"""The Assistant Axis pipeline over a run directory: rollouts → scores → vectors → axis → analysis.

Every step reads what is on disk and does only what is missing, so a killed run resumes where it
stopped. Rollouts are saved in fixed chunks of the plan (chunk k is always the same items; reply j
of chunk k samples from the random stream of (seed + k, j)) and generated in fixed waves of chunks,
so a resumed run produces exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_axis.axis import Axis, axis_metadata, compute_axis, load_axis, save_axis
from persona_axis.build.executors import Executor, ModelIdentity, executor_or_local
from persona_axis.build.persona_space import (
    RunAnalysis,
    UnjudgedAlignment,
    analyze_persona_space,
    trait_alignment,
    unjudged_cos_axis_pc1,
)
from persona_axis.build.plan import (
    PRESETS,
    ROLLOUT_ENGINE,
    PlanItem,
    Settings,
    plan_rollouts,
    question_ids_by_kind,
    rollout_waves,
    run_waves,
    select_roles,
    select_traits,
    trait_record_name,
)
from persona_axis.catalog import DEFAULT_ROLE, Catalog, Role, short_model_name
from persona_axis.decode.generate import Reply
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import Judge, JudgeItem
from persona_axis.measurement import check_layer_index
from persona_axis.model.loading import LoadedModel
from persona_axis.store import RunLayout, RunStore, load_tensors, rollout_kind


def step_rollouts(store: RunStore, executor: Executor, plan: list[PlanItem], settings: Settings, progress: bool) -> None:
    """Generate missing rollouts; each chunk saves its activations, then appends its records, once its replies are in.

    Chunks go through one continuous batch per wave of CHUNKS_PER_WAVE chunks (a slot whose reply
    ended takes the wave's next item at once). A wave with any chunk missing is generated whole, so
    every reply is batched with the same companions as in an uninterrupted run. `executor` (this
    process, or a cluster) generates the waves; this process alone records the chunks it returns,
    each once.
    """
    done = {r["id"] for r in store.records("rollouts")}
    waves = rollout_waves(plan, settings)
    chunks = [chunk for wave in waves for chunk in wave.values()]  # chunk k is the plan's k-th slice
    complete = [store.has(store.chunk_file(k)) and all(item.id in done for item in chunk) for k, chunk in enumerate(chunks)]
    missing = [wave for wave in waves if not all(complete[k] for k in wave)]
    bar = tqdm(total=len(plan), desc=f"rollouts ({executor.name})", unit="reply", disable=not progress)
    bar.update(sum(len(chunks[k]) for k, is_complete in enumerate(complete) if is_complete))
    for k, replies in run_waves(executor, missing, settings):
        if not complete[k]:
            _save_chunk(store, k, chunks[k], replies, done)
            complete[k] = True
            bar.update(len(replies))
    bar.close()
    if not all(complete):
        raise PersonaAxisError(f"the {executor.name} executor returned {complete.count(False)} chunks short: run again "
                               "to resume")
    store.mark_step("rollouts", {"done": True, "n": len(plan)})


def _save_chunk(store: RunStore, index: int, chunk: list[PlanItem], replies: list[Reply], done: set[str]) -> None:
    """Save a chunk's activations [n, layers, hidden], then append the records not already on disk."""
    store.save_chunk(index, torch.stack([r.captured_means() for r in replies]), [i.id for i in chunk])
    store.append("rollouts", [
        {**asdict(item), "chunk": index, "response": r.text, "n_tokens": len(r.token_ids), "finished": r.finished}
        for item, r in zip(chunk, replies) if item.id not in done
    ])


def _engine_identity(store: RunStore, identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` plus the engine that generates rollouts, so a run is never resumed by a different one.

    A run whose rollouts an earlier engine finished keeps its identity: nothing is left to generate,
    so judging and analysis can still resume.
    """
    manifest = store.read_manifest()
    earlier = bool(manifest) and "rollout_engine" not in manifest.get("identity", {})
    if earlier and manifest.get("steps", {}).get("rollouts", {}).get("done"):
        return identity
    return {**identity, "rollout_engine": ROLLOUT_ENGINE}


def _judge_items(records: list[dict[str, Any]], catalog: Catalog) -> list[JudgeItem]:
    """What the judge sees for each role or trait rollout: the character's name, description and eval prompt."""
    characters = {r.name: r for r in catalog.roles} | {trait_record_name(t.name): t for t in catalog.traits}
    items = []
    for record in records:
        character = characters.get(record["role"])
        name = record["role"].removeprefix("trait:") if rollout_kind(record) == "trait" else record["role"]
        items.append(JudgeItem(name, character.description if character else "", record["question"],
                               record["response"], eval_prompt=character.eval_prompt if character else "",
                               kind=rollout_kind(record)))
    return items


def step_scores(store: RunStore, judges: dict[str, Judge], catalog: Catalog, progress: bool, batch: int = 64) -> None:
    """Judge every role and trait rollout its judge (judges["role"], judges["trait"]) has not scored yet.

    Default-Assistant rollouts are not judged. Scores carry the judge's id, so switching judges
    re-judges the same rollouts without regenerating. Each kind is judged in fixed batches over all
    its rollouts in id order, whatever order they were written in (an embedding judge pads its batch):
    a batch left partly scored by a crash is judged again whole and only its missing scores appended.
    """
    scored = {(r["id"], r["judge"]) for r in store.records("scores")}
    records = sorted((r for r in store.records("rollouts") if rollout_kind(r) in judges), key=lambda r: r["id"])
    missing = lambda r: (r["id"], judges[rollout_kind(r)].id) not in scored  # noqa: E731
    bar = tqdm(total=sum(map(missing, records)), desc="judging", unit="reply", disable=not progress)
    for kind, judge in judges.items():
        mine = [r for r in records if rollout_kind(r) == kind]
        for start in range(0, len(mine), batch):
            part = mine[start : start + batch]
            if not any(map(missing, part)):
                continue
            verdicts = judge.score(_judge_items(part, catalog))
            new = [(r, v) for r, v in zip(part, verdicts) if missing(r)]
            store.append("scores", [{"id": r["id"], "score": v.score, "judge": judge.id, "rationale": v.rationale}
                                    for r, v in new])
            bar.update(len(new))
    bar.close()
    store.mark_step("scores", {"done": True})


VECTOR_FILES = {"roles": RunLayout.VECTORS, "traits": RunLayout.TRAIT_VECTORS, "all_answers": RunLayout.ALL_ANSWER_VECTORS}


def accumulate_vectors(store: RunStore, judges: dict[str, str]) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, int]]]:
    """One pass over the activation chunks: float64 sums [layers, hidden] and counts per set and name.

    Sets: "roles" (score-3 role answers, plus "default" for every default answer), "traits"
    (score-3 trait answers), "all_answers" (every role answer, whatever its score).
    """
    kinds = store.rollout_kinds()
    names = {r["id"]: r["role"] for r in store.records("rollouts")}
    scores = store.scores_by(judges["role"]) | store.scores_by(judges.get("trait", judges["role"]))
    sums: dict[str, dict[str, Tensor]] = {k: {} for k in VECTOR_FILES}
    counts: dict[str, dict[str, int]] = {k: {} for k in VECTOR_FILES}

    def add(group: str, name: str, row: Tensor) -> None:
        sums[group][name] = sums[group].get(name, 0) + row.double()
        counts[group][name] = counts[group].get(name, 0) + 1

    for ids, means in store.activation_chunks():
        for row, record_id in enumerate(ids):
            kind, name = kinds.get(record_id), names.get(record_id, "")
            if kind == "default":
                add("roles", DEFAULT_ROLE, means[row])
            elif kind == "role":
                add("all_answers", name, means[row])
                if scores.get(record_id) == 3:
                    add("roles", name, means[row])
            elif kind == "trait" and scores.get(record_id) == 3:
                add("traits", name.removeprefix("trait:"), means[row])
    return sums, counts


def step_vectors(store: RunStore, roles: tuple[Role, ...], judges: dict[str, str], min_score3: int,
                 traits: tuple[Role, ...] = ()) -> dict[str, Any]:
    """Role vectors (mean of score-3 answers), the default vector, trait vectors and all-answer role vectors.

    Each vector is [layers, hidden] float32. Roles and traits short of `min_score3` score-3 answers
    are dropped (listed, never silently). judges: {"role": judge id, "trait": judge id}. Writes
    the VECTORS file (default + kept roles), TRAIT_VECTORS (kept traits) and ALL_ANSWER_VECTORS (every
    role with an answer, no judge involved) of store.RunLayout.
    """
    sums, counts = accumulate_vectors(store, judges)
    if DEFAULT_ROLE not in sums["roles"]:
        raise PersonaAxisError("no default-Assistant rollouts found: the rollouts step did not finish")
    used = [r.name for r in roles if counts["roles"].get(r.name, 0) >= min_score3]
    traits_used = [t.name for t in traits if counts["traits"].get(t.name, 0) >= min_score3]
    kept = {"roles": [DEFAULT_ROLE, *used], "traits": traits_used, "all_answers": list(sums["all_answers"])}
    summary = {"roles_used": used, "roles_dropped": {r.name: counts["roles"].get(r.name, 0) for r in roles
                                                     if r.name not in used},
               "score3_counts": {n: counts["roles"][n] for n in used}, "judge": judges["role"],
               "trait_judge": judges.get("trait", ""), "traits_used": traits_used,
               "traits_dropped": {t.name: counts["traits"].get(t.name, 0) for t in traits if t.name not in traits_used},
               "n_default": counts["roles"][DEFAULT_ROLE], "min_score3": min_score3,
               "groups": {r.name: r.group for r in roles}}
    for group, file in VECTOR_FILES.items():
        vectors = {name: (sums[group][name] / counts[group][name]).float() for name in kept[group]}
        if vectors or group == "roles":
            store.save_tensors(file, vectors, {"summary": json.dumps(summary)})
    store.mark_step("vectors", {"done": True, "roles_used": len(used), "roles_dropped": len(roles) - len(used),
                                "traits_used": len(traits_used)})
    return summary


def step_axis(store: RunStore, model: ModelIdentity, used: list[str]) -> Axis:
    """axis = default vector − mean of role vectors, saved as axis.safetensors."""
    if not used:
        raise PersonaAxisError("every role was dropped (too few score-3 answers): lower --min-score3 or run more questions")
    tensors, _ = load_tensors(store.layout.vectors)
    vectors = compute_axis(tensors[DEFAULT_ROLE], torch.stack([tensors[name] for name in used]))
    manifest_hash = hashlib.sha256(json.dumps(store.read_manifest()["identity"], sort_keys=True).encode()).hexdigest()
    axis = Axis(vectors, axis_metadata(model.name, model.source_hash, manifest_hash))
    save_axis(axis, store.root / RunLayout.AXIS)
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
    lm: LoadedModel | None,
    catalog: Catalog,
    settings: Settings,
    judge: Judge,
    role_names: list[str] | None = None,
    preset: str = "custom",
    progress: bool = True,
    trait_judge: Judge | None = None,
    executor: Executor | None = None,
    model_spec: str | None = None,
) -> Path:
    """Run (or resume) every step into `out`; returns the run directory. Refuses a directory whose run differs.

    `judge` scores role adherence; `trait_judge` (default: `judge`) scores trait expression.
    `{model_name}` in the catalogue's prompts becomes the model's short name. `executor` generates
    the rollouts (default: this process, on `lm`; a RayExecutor loads the model on each of its actors,
    so `lm` may then be None); the result does not depend on it, so a run started on one executor
    resumes on another. `model_spec` (the `--model` value that loads the model again) is recorded in the
    manifest, outside the identity, so later commands on the run need no `--model` (`recorded_model_spec`).
    """
    executor = executor_or_local(executor, lm, "run_pipeline")
    model = executor.model_identity()
    catalog = catalog.for_model(short_model_name(model.name))
    roles, traits = select_roles(catalog, settings, role_names), select_traits(catalog, settings)
    plan = plan_rollouts(catalog, settings, roles, traits)
    identity = {
        "model": model.name, "model_hash": model.source_hash, **dict(model.numerics),
        "catalog": catalog.digest(), "roles": sorted(r.name for r in roles), "settings": asdict(settings),
    }
    judges = {"role": judge, "trait": trait_judge or judge}
    with RunStore.open(out) as store:
        identity = _engine_identity(store, identity)
        store.claim(identity, {"preset": preset, "versions": _versions(), "catalog_source": catalog.source,
                               "questions": question_ids_by_kind(plan), "traits": [t.name for t in traits],
                               **({"model_spec": model_spec} if model_spec else {})})
        step_rollouts(store, executor, plan, settings, progress)
        step_scores(store, judges, catalog, progress)
        summary = step_vectors(store, roles, {k: j.id for k, j in judges.items()}, settings.min_score3, traits)
        step_axis(store, model, summary["roles_used"])
    return Path(out)


def recorded_model_spec(run_dir: str | Path) -> str | None:
    """The `--model` spec a run directory's manifest records (None: not a run, or made before runs recorded it)."""
    try:
        manifest = RunStore(Path(run_dir)).read_manifest() if Path(run_dir).is_dir() else {}
    except (OSError, ValueError):
        return None  # an unreadable manifest: the command that reads the run says what is wrong
    spec = manifest.get("model_spec") if isinstance(manifest, dict) else None
    return spec if isinstance(spec, str) else None


def run_catalog(run_dir: str | Path) -> Catalog:
    """The catalogue a run was made with (its manifest's catalog_source: "builtin" or a directory)."""
    from persona_axis.catalog import load_catalog

    source = RunStore(Path(run_dir)).read_manifest().get("catalog_source", "builtin")
    return load_catalog(None if source == "builtin" else source)


def preset_settings(name: str, **overrides: Any) -> Settings:
    """A preset's settings with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise PersonaAxisError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def analyze_run(run_dir: str | Path, layer: int | None = None, standardise: bool = False,
                write: bool = True) -> RunAnalysis:
    """Persona-space analysis of a finished run; with write=True also writes persona_space.json, figures/, report.html.

    Beyond the PCA of role vectors (persona_space.analyze_persona_space) it adds, when the run
    stored them: the traits' cosines with the axis and with PC1 at every layer, and
    cos(axis, PC1) per layer for role vectors built from all answers (no judge).
    """
    from persona_axis.build.report import write_report

    root = Path(run_dir)
    if not (root / VECTOR_FILES["roles"]).exists() or not (root / RunLayout.AXIS).exists():
        raise PersonaAxisError(f"{root} has no finished run (vectors and axis missing): run `persona-axis run` first")
    tensors, meta = load_tensors(root / VECTOR_FILES["roles"])
    summary = json.loads(meta["summary"])
    axis = load_axis(root)
    index = check_layer_index(axis.layer_or_middle(layer), axis.n_layers, "layer")
    role_vectors = {name: tensors[name] for name in summary["roles_used"]}
    unjudged = None
    if (root / VECTOR_FILES["all_answers"]).exists():
        everything, _ = load_tensors(root / VECTOR_FILES["all_answers"])
        unjudged = UnjudgedAlignment(len(everything), unjudged_cos_axis_pc1(tensors[DEFAULT_ROLE], everything, standardise))
    traits_path = root / VECTOR_FILES["traits"]
    trait_vectors = load_tensors(traits_path)[0] if traits_path.exists() else {}
    analysis = RunAnalysis(
        analyze_persona_space(role_vectors, axis.vectors, index, summary["groups"], standardise=standardise),
        roles_dropped=summary["roles_dropped"], traits_used=len(trait_vectors),
        traits_dropped=summary.get("traits_dropped", {}), unjudged=unjudged,
        traits=trait_alignment(trait_vectors, role_vectors, axis.vectors, standardise) if len(trait_vectors) >= 2 else None,
    )
    if not write:
        return analysis
    manifest = RunStore(root).read_manifest()
    (root / RunLayout.PERSONA_SPACE).write_text(json.dumps(analysis.to_json(), indent=2))
    details = {"model": manifest["identity"]["model"], "preset": manifest.get("preset", ""),
               "judge": summary["judge"], "default rollouts": summary["n_default"],
               "trait judge": summary.get("trait_judge", ""), "min score-3 answers per role": summary["min_score3"]}
    write_report(analysis, root, title=f"Persona space of {manifest['identity']['model']}", details=details)
    return analysis
