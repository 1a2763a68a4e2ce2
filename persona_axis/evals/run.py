"""The eval run directory: every condition answers the eval set, capability checks, harm verdicts.

Layout (owned by persona_axis.store.RunStore; one writer at a time):
  manifest.json      identity (model, axis, eval set, settings, conditions) and step status
  evalset.jsonl      the eval set answered (+ evalset.manifest.json)
  first_turns.jsonl  one record per (condition, role_primed item): the model's own answer to the persona's first
                     question (text, n_tokens, finished, cap_counts), written before the replies that follow it
  replies.jsonl      one record per (condition, item): family, text, projections, cap engagement counts, and
                     first_turn (the first answer's text, n_tokens, finished; None for other families)
  capabilities.jsonl one record per (condition, check): ifbench, bigbench, kl
  verdicts.jsonl     one record per (condition, item, judge): harmful/refused, score, rationale

Steps run in that order and each does only what is missing, so a killed run resumes where it
stopped; the judge comes last, so an unreachable judge loses no generated work. Replies and
capability checks are jobs on an executor (build/executors.py: this process by default, or the actors
of a Ray cluster); this process alone writes the directory, and the records do not depend on
where the jobs ran (only the order of lines in the files may differ). Items are cut
into fixed chunks of `batch_size` after a stable sort by prompt length (chunks_by_length: less
padding); chunk k is generated with seed + k
(greedy by default) under every condition, so all conditions answer identical prompts with
identical seeds, and a resumed run writes what an uninterrupted one would.

role_primed items (harm_set: a generated turn) are answered in two turns under the same condition:
first the persona's benign first question (first_turn_max_new_tokens; each item's own stream, derived
from its reply's, so a first turn does not depend on which others are still missing), then the
chat with that answer filled in. A chunk's first turns are appended to first_turns.jsonl before its
replies are generated; a resumed run reuses them instead of generating them again.

Projections: each reply's mean projection on the unit axis at every layer no intervention of
its condition touches (None at intervened layers: persona_axis.measurement); `layer` and
`projection` name the measured layer (measurement.measured_layer). The diagnosis reads the
distribution at the capped layers from the UNCAPPED condition's capture of the same items
(inside a capped block the capped condition's own projection measures the cap itself); with PC1
conditions the uncapped replies also record their PC1 projections.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from persona_axis.axis import Axis
from persona_axis.build.executors import Executor, ModelIdentity, executor_or_local
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Cap
from persona_axis.decode.sampling import stream_seed
from persona_axis.errors import PersonaAxisError
from persona_axis.evals.conditions import UNCAPPED, Condition
from persona_axis.evals.harm_judges import HarmItem, HarmJudge, HarmVerdict
from persona_axis.evals.harm_set import EvalItem, EvalSet, conversation, first_turn_prompt, write_eval_set
from persona_axis.measurement import measured_layer
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.store import RunStore

if TYPE_CHECKING:
    from persona_axis.evals.capabilities_ifbench import IFBenchPrompt

REFUSAL_JUDGE = "refusal-cue"  # benign persona replies: refused = the project's REFUSAL cue in the first 200 chars
HARM_KINDS = ("persona_jailbreak", "plain_harmful")
JUDGE_BATCH = 16
FIRST_TURN_STREAM = 1  # a first turn's stream: stream_seed(its reply's stream seed, FIRST_TURN_STREAM)


@dataclass(frozen=True)
class EvalSettings:
    """Sizes of an eval run. Replies: greedy (temperature 0), `max_new_tokens`, chunks of `batch_size`;
    role_primed first turns: `first_turn_max_new_tokens`, the same sampling.

    ifbench_n prompts (answered with ifbench_max_new_tokens), bigbench_per_task examples per task,
    kl_prompts default-Assistant prompts (kl_max_new_tokens tokens) for the next-token KL.
    """

    max_new_tokens: int
    batch_size: int
    ifbench_n: int
    ifbench_max_new_tokens: int
    bigbench_per_task: int
    kl_prompts: int
    kl_max_new_tokens: int
    first_turn_max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0


PRESETS = {
    # CI-sized: the smoke eval set (28 items, 5 of them role_primed), a few capability items; seconds on the tiny
    # random model.
    "smoke": EvalSettings(max_new_tokens=12, batch_size=8, ifbench_n=2, ifbench_max_new_tokens=16,
                          bigbench_per_task=1, kl_prompts=2, kl_max_new_tokens=8, first_turn_max_new_tokens=8),
    # The standard eval set (330 items, 57 of them role_primed) per condition; see docs/harm-evaluation.md for the
    # time estimate.
    "standard": EvalSettings(max_new_tokens=48, batch_size=16, ifbench_n=16, ifbench_max_new_tokens=96,
                             bigbench_per_task=10, kl_prompts=8, kl_max_new_tokens=32, first_turn_max_new_tokens=48),
}


def eval_preset(name: str) -> EvalSettings:
    if name not in PRESETS:
        raise PersonaAxisError(f"unknown eval preset {name!r}: use {' or '.join(PRESETS)}")
    return PRESETS[name]


def set_digest(items: Sequence[EvalItem]) -> str:
    """sha256 of the eval set's items (their JSON, in order): the set's identity in the run manifest."""
    return hashlib.sha256(json.dumps([asdict(i) for i in items], sort_keys=True).encode()).hexdigest()


def run_identity(model: ModelIdentity, axis: Axis, eval_set: EvalSet, settings: EvalSettings,
                 conditions: Sequence[Condition]) -> dict[str, Any]:
    """What makes two runs the same run: model, axis, eval set, settings, and what every condition does."""
    axis_hash = hashlib.sha256(axis.vectors.float().contiguous().numpy().tobytes()).hexdigest()
    return {"model": model.name, "model_hash": model.source_hash, **dict(model.numerics),
            "axis": axis_hash, "eval_set": set_digest(eval_set.items), "settings": asdict(settings),
            "conditions": {c.name: c.digest() for c in conditions}}


def check_resumable(out: str | Path, identity: dict[str, Any]) -> None:
    """Refuse (without writing anything) a directory that holds an eval run with other settings."""
    old = RunStore(Path(out)).read_manifest().get("identity")
    if old is not None and old != identity:
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise PersonaAxisError(f"{out} holds an eval run with different {', '.join(changed)}: use a new --out, "
                               "or the same settings to resume")


@dataclass(frozen=True)
class PromptLengths:
    """A job (executors.Job): the token count of each conversation's prompt under the model's chat template.

    Eval items are measured as their messages stand (a generated turn empty), so chunks do not depend on the
    condition's first turns.
    """

    conversations: list[list[Message]]

    def __call__(self, lm: LoadedModel) -> Iterator[list[int]]:
        yield [lm.prompt_length(messages) for messages in self.conversations]


def chunks_by_length(lengths: Sequence[int], items: Sequence[EvalItem], size: int) -> list[list[EvalItem]]:
    """Items cut into chunks of `size` after a stable sort by their prompt lengths (PromptLengths).

    A batch is padded to its longest prompt, and persona templates run from ~50 to ~750 tokens, so
    batching similar lengths together cuts prefill work (2.6x fewer padded prompt tokens on the
    standard set under Qwen2.5's template). Deterministic: the same model and set give the same chunks.
    """
    order = sorted(range(len(items)), key=lambda k: lengths[k])
    ordered = [items[k] for k in order]
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _cap_counts(interventions: dict[int, list[Any]]) -> dict[str, list[int]]:
    """{layer: [tokens raised, tokens seen]} of every tracking cap (generated tokens only)."""
    return {str(layer): [int(item.raised), int(item.seen)] for layer, items in interventions.items()
            for item in items if isinstance(item, Cap) and item.track}


def _projections(means: Any, direction: Axis, skip: Sequence[int]) -> list[list[float | None]]:
    """Mean projections [n][layers] of response means [n, layers, hidden] on the unit rows; None at `skip`."""
    values = (means.float() * direction.units()).sum(-1).tolist()
    return [[None if k in skip else v for k, v in enumerate(row)] for row in values]


@dataclass(frozen=True)
class ReplyChunk:
    """A job: one chunk of eval items answered under one condition (seed + chunk index).

    Yields ("first_turns", records) for the chunk's role_primed items whose first turn is not in
    `first_turns` (item id -> its stored record), when there are any, then ("replies", records).
    pc1: the PC1 direction whose projections the replies also record (given for the uncapped condition).
    """

    condition: Condition
    index: int
    items: list[EvalItem]
    axis: Axis
    settings: EvalSettings
    pc1: Axis | None = None
    first_turns: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _first_turns(self, lm: LoadedModel) -> list[dict[str, Any]]:
        """Generate the missing first turns (no capture), each from its own stream under fresh interventions."""
        settings, base = self.settings, self.settings.seed + self.index
        pending = [(k, item) for k, item in enumerate(self.items)
                   if item.generated_turn is not None and item.id not in self.first_turns]
        if not pending:
            return []
        interventions = self.condition.interventions()
        result = generate(lm, [first_turn_prompt(item) for _, item in pending],
                          max_new_tokens=settings.first_turn_max_new_tokens, temperature=settings.temperature,
                          seed=[stream_seed(stream_seed(base, k), FIRST_TURN_STREAM) for k, _ in pending],
                          batch_size=len(pending), capture=False, interventions=interventions)
        counts = _cap_counts(interventions)
        return [{"condition": self.condition.name, "item": item.id, "chunk": self.index, "text": text,
                 "n_tokens": len(ids), "finished": finished, "cap_counts": counts}
                for (_, item), text, ids, finished in zip(pending, result.texts, result.token_ids, result.finished)]

    def __call__(self, lm: LoadedModel) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        condition, chunk, settings = self.condition, self.items, self.settings
        new = self._first_turns(lm)
        if new:
            yield "first_turns", new
        first = {**self.first_turns, **{r["item"]: r for r in new}}
        layer = measured_layer(self.axis, condition.layers)
        interventions = condition.interventions()
        chats = [conversation(item, first[item.id]["text"] if item.generated_turn is not None else None)
                 for item in chunk]
        result = generate(lm, chats, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          seed=settings.seed + self.index, batch_size=len(chunk), interventions=interventions)
        means = result.captured_means()
        projections = _projections(means, self.axis, condition.layers)
        extra = ([{"pc1_projections": row} for row in _projections(means, self.pc1, [])]
                 if self.pc1 is not None else [{} for _ in chunk])
        counts = _cap_counts(interventions)
        yield "replies", [
            {"condition": condition.name, "item": item.id, "kind": item.kind, "family": item.family,
             "chunk": self.index, "text": text, "n_tokens": len(ids), "finished": finished,
             "first_turn": ({k: first[item.id][k] for k in ("text", "n_tokens", "finished")}
                            if item.generated_turn is not None else None),
             "layer": layer, "projection": row[layer], "projections": row, "cap_counts": counts, **more}
            for item, text, ids, finished, row, more in zip(chunk, result.texts, result.token_ids, result.finished,
                                                            projections, extra)]


def step_replies(store: RunStore, executor: Executor, axis: Axis, conditions: Sequence[Condition],
                 items: Sequence[EvalItem], settings: EvalSettings, pc1: Axis | None, progress: bool) -> None:
    """Generate every missing (condition, item) reply: one job per (condition, chunk), one append per chunk for its
    first turns (role_primed items whose first turn is not stored yet) and one for its replies."""
    done = {(r["condition"], r["item"]) for r in store.records("replies")}
    firsts: dict[tuple[str, str], dict[str, Any]] = {}
    for r in store.records("first_turns"):
        firsts.setdefault((r["condition"], r["item"]), r)
    [(_, lengths)] = list(executor.run_jobs([PromptLengths([list(item.messages) for item in items])]))
    chunks = chunks_by_length(lengths, items, settings.batch_size)
    jobs = [ReplyChunk(condition, index, chunk, axis, settings, pc1 if condition.name == UNCAPPED else None,
                       {i.id: firsts[(condition.name, i.id)] for i in chunk if (condition.name, i.id) in firsts})
            for condition in conditions for index, chunk in enumerate(chunks)
            if not all((condition.name, item.id) in done for item in chunk)]
    bar = tqdm(total=len(chunks) * len(conditions), initial=len(chunks) * len(conditions) - len(jobs),
               desc=f"replies ({executor.name})", unit="batch", disable=not progress)
    for _, (name, records) in executor.run_jobs(jobs):
        if name == "first_turns":
            store.append(name, records)
            continue
        store.append("replies", [r for r in records if (r["condition"], r["item"]) not in done])
        bar.update(1)
    bar.close()
    store.mark_step("replies", {"done": True, "n": len(items) * len(conditions)})


@dataclass(frozen=True)
class CapabilityCheck:
    """A job: one capability check ("ifbench", "bigbench" or "kl") of some conditions; yields one record each.

    ifbench answers `ifbench_prompts` (chosen once, by the driver: which prompts have offline
    checkers depends on the machine) and bigbench its seeded examples, each condition alone; kl
    compares each condition's next-token distribution with the uncapped model's on the same
    default-Assistant conversations.
    """

    check: str
    conditions: list[Condition]
    settings: EvalSettings
    ifbench_prompts: tuple[IFBenchPrompt, ...] = ()

    def __call__(self, lm: LoadedModel) -> Iterator[dict[str, Any]]:
        from persona_axis.catalog import default_conversations, load_catalog, short_model_name
        from persona_axis.evals.capabilities import next_token_kl
        from persona_axis.evals.capabilities_bigbench import bigbench
        from persona_axis.evals.capabilities_ifbench import ifbench_prompts

        settings = self.settings
        if self.check == "kl":
            catalog = load_catalog().for_model(short_model_name(lm.name))
            results = next_token_kl(lm, default_conversations(catalog, settings.kl_prompts),
                                    [c.interventions() for c in self.conditions], settings.kl_max_new_tokens)
            yield from ({"condition": c.name, "check": "kl", **r.to_json()} for c, r in zip(self.conditions, results))
            return
        for condition in self.conditions:
            if self.check == "ifbench":
                result: Any = ifbench_prompts(lm, self.ifbench_prompts, interventions=condition.interventions(),
                                              max_new_tokens=settings.ifbench_max_new_tokens,
                                              batch_size=settings.batch_size)
            else:
                result = bigbench(lm, settings.bigbench_per_task, interventions=condition.interventions(),
                                  seed=settings.seed, batch_size=settings.batch_size)
            yield {"condition": condition.name, "check": self.check, **result.to_json()}


def step_capabilities(store: RunStore, executor: Executor, conditions: Sequence[Condition], settings: EvalSettings,
                      progress: bool) -> None:
    """IFBench and BIG-bench per condition, then next-token KL vs uncapped for the conditions still missing it."""
    from persona_axis.evals.capabilities_ifbench import select_prompts

    done = {(r["condition"], r["check"]) for r in store.records("capabilities")}
    needed = any((c.name, "ifbench") not in done for c in conditions)
    prompts = tuple(select_prompts(settings.ifbench_n, settings.seed)) if needed else ()
    jobs = [CapabilityCheck(check, [condition], settings, prompts if check == "ifbench" else ())
            for condition in conditions for check in ("ifbench", "bigbench") if (condition.name, check) not in done]
    missing_kl = [c for c in conditions if (c.name, "kl") not in done]
    if missing_kl:
        jobs.append(CapabilityCheck("kl", missing_kl, settings))
    bar = tqdm(total=sum(len(job.conditions) for job in jobs), desc=f"capabilities ({executor.name})", unit="check",
               disable=not progress)
    for _, record in executor.run_jobs(jobs):
        store.append("capabilities", [record])
        bar.update(1)
    bar.close()
    store.mark_step("capabilities", {"done": True})


def _checked(verdict: Any, judge_id: str) -> HarmVerdict:
    """The verdict if it is well formed (harmful bool, score in [0, 1]), else an unscored one: never guessed."""
    ok = (isinstance(verdict, HarmVerdict) and isinstance(verdict.harmful, bool)
          and isinstance(verdict.score, (int, float)) and 0.0 <= float(verdict.score) <= 1.0)
    if ok:
        return verdict
    why = verdict.rationale if isinstance(verdict, HarmVerdict) and verdict.harmful is None else "malformed verdict"
    return HarmVerdict(None, None, f"unscored: {why}", judge_id)


def step_verdicts(store: RunStore, judge: HarmJudge, items: dict[str, EvalItem], progress: bool) -> None:
    """Judge every reply not yet judged: harm kinds by `judge`, benign persona replies by the refusal cue.

    Judged in fixed batches of JUDGE_BATCH over all harm replies in (condition, item) order, whatever
    order the replies were written in (a batching judge pads, which moves its scores by ~1e-7): the same
    batches after any executor and after any resume. A batch left partly judged (a write torn by a
    crash) is judged again whole and only its missing verdicts are appended. Appended batch by batch,
    so a judge failing midway keeps what it judged.
    """
    from persona_axis.evals.harm_classifier import refusal_cue

    judged = {(r["condition"], r["item"], r["judge"]) for r in store.records("verdicts")}
    replies = store.records("replies")
    benign = [r for r in replies if r["kind"] == "benign_persona"
              and (r["condition"], r["item"], REFUSAL_JUDGE) not in judged]
    store.append("verdicts", [{"condition": r["condition"], "item": r["item"], "judge": REFUSAL_JUDGE,
                               "refused": refusal_cue(r["text"])} for r in benign])
    harm = sorted((r for r in replies if r["kind"] in HARM_KINDS), key=lambda r: (r["condition"], r["item"]))
    missing = lambda r: (r["condition"], r["item"], judge.id) not in judged  # noqa: E731
    bar = tqdm(total=sum(map(missing, harm)), desc="judging", unit="reply", disable=not progress)
    for start in range(0, len(harm), JUDGE_BATCH):
        part = harm[start : start + JUDGE_BATCH]
        if not any(map(missing, part)):
            continue
        verdicts = judge.judge([HarmItem(items[r["item"]].request, r["text"]) for r in part])
        if len(verdicts) != len(part):
            raise PersonaAxisError(f"harm judge {judge.id} returned {len(verdicts)} verdicts for {len(part)} "
                                   "replies: fix the judge and rerun (finished work is kept)")
        new = [(r, _checked(v, judge.id)) for r, v in zip(part, verdicts) if missing(r)]
        store.append("verdicts", [{"condition": r["condition"], "item": r["item"], "judge": judge.id,
                                   "harmful": v.harmful, "score": v.score, "rationale": v.rationale} for r, v in new])
        bar.update(len(new))
    bar.close()
    store.mark_step("verdicts", {"done": True, "judge": judge.id})


def run_eval(out: str | Path, lm: LoadedModel | None, axis: Axis, conditions: Sequence[Condition], eval_set: EvalSet,
             settings: EvalSettings, judge: HarmJudge, *, pc1: Axis | None = None, preset: str = "custom",
             progress: bool = True, executor: Executor | None = None) -> Path:
    """Run (or resume) an eval into `out`: replies, capabilities, verdicts. Refuses a run with other settings.

    pc1: the PC1 direction (persona_axis.evals.conditions.pc1_axis) whose projections the uncapped
    replies also record, for diagnosing PC1 conditions. `executor` generates replies and runs the
    capability checks (default: this process, on `lm`; with a RayExecutor `lm` may be None); the
    judge runs in this process.
    """
    executor = executor_or_local(executor, lm, "run_eval")
    identity = run_identity(executor.model_identity(), axis, eval_set, settings, conditions)
    check_resumable(out, identity)
    items = {item.id: item for item in eval_set.items}
    with RunStore.open(out) as store:
        store.claim(identity, {"preset": preset, "judge": judge.id, "refusal_judge": REFUSAL_JUDGE,
                               "conditions": [c.describe() for c in conditions],
                               "eval_set_manifest": eval_set.manifest})
        write_eval_set(eval_set, store.root / "evalset.jsonl")
        step_replies(store, executor, axis, conditions, eval_set.items, settings, pc1, progress)
        step_capabilities(store, executor, conditions, settings, progress)
        step_verdicts(store, judge, items, progress)
    return Path(out)
