"""The eval run directory: every condition answers the eval set, capability checks, harm verdicts.

Layout (owned by persona_axis.store.RunStore; one writer at a time):
  manifest.json      identity (model, axis, eval set, settings, conditions) and step status
  evalset.jsonl      the eval set answered (+ evalset.manifest.json)
  first_turns.jsonl  one record per (condition, turn, sample), turn = harm_set.first_turn_key (a role_primed item's
                     id, or "role_probe/<persona>": a role's probes share one): the model's own answer to the
                     persona's first question (text, n_tokens, finished, its mean projection at the measured layer
                     and per layer, cap_counts), all written before any reply
  replies.jsonl      one record per (condition, item, sample): family, text, projections, cap engagement counts,
                     and first_turn (the first answer's text, n_tokens, finished, projection(s); None for items
                     without a generated turn)
  capabilities.jsonl one record per (condition, check): ifbench, bigbench, kl
  verdicts.jsonl     one record per (condition, item, sample, judge): harmful/refused, score, rationale

Steps run in that order and each does only what is missing, so a killed run resumes where it
stopped; the judge comes last, so an unreachable judge loses no generated work. Replies and
capability checks are jobs on an executor (build/executors.py: this process by default, or the actors
of a Ray cluster); this process alone writes the directory, and the records do not depend on
where the jobs ran (only the order of lines in the files may differ). Items are cut
into fixed chunks of `batch_size` after a stable sort by prompt length (chunks_by_length: less
padding); chunk k is seeded seed + k, and each of an item's `samples` replies draws from its own
stream (reply_stream: a function of the chunk seed, the item's position and the sample index, never
of the condition), so all conditions answer identical prompts from identical streams (paired
samples; greedy by default, where one sample is all there is), and a resumed run writes what an
uninterrupted one would.

Items with a generated turn (harm_set) are answered in two phases under the same condition: first
every distinct first turn (the persona's benign first question, first_turn_max_new_tokens; its own
chunks by prompt length, each turn's stream a function of its chunk, position and sample, so a first
turn does not depend on which others are still missing), then the replies, each chat with its first
turn's answer filled in. A resumed run reuses the stored first turns instead of generating them again.

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
from collections.abc import Iterator, Mapping, Sequence
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
from persona_axis.evals.harm_set import (
    EvalItem,
    EvalSet,
    conversation,
    first_turn_key,
    first_turn_prompt,
    write_eval_set,
)
from persona_axis.measurement import measured_layer
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.store import RunStore

if TYPE_CHECKING:
    from persona_axis.evals.capabilities_ifbench import IFBenchPrompt

REFUSAL_JUDGE = "refusal-cue"  # benign persona replies: refused = the project's REFUSAL cue in the first 200 chars
HARM_KINDS = ("persona_jailbreak", "plain_harmful")  # the headline harm rates
JUDGED_KINDS = (*HARM_KINDS, "role_probe")  # every kind the harm judge reads (role_probe: the role correlation)
JUDGE_BATCH = 16
FIRST_TURN_STREAM = 1  # a first turn's stream: stream_seed(its reply's stream seed, FIRST_TURN_STREAM)
SAMPLE_STREAM = 2  # sample s > 0 of an item: stream_seed(its sample-0 stream seed, SAMPLE_STREAM + s)


@dataclass(frozen=True)
class EvalSettings:
    """Sizes of an eval run. Replies: `samples` per item, each `max_new_tokens` long, drawn at `temperature` with
    nucleus `top_p` (temperature 0: greedy, so one sample is all there is), items in chunks of `batch_size`;
    generated first turns: `first_turn_max_new_tokens`, the same sampling, one per sample.

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
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise PersonaAxisError(f"samples must be at least 1, not {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise PersonaAxisError("several samples per item need temperature > 0 (greedy replies are all the same)")


PRESETS = {
    # CI-sized: the smoke eval set (34 items; 8 first turns: 5 role_primed, 3 probed roles), a few capability items;
    # seconds on the tiny random model.
    "smoke": EvalSettings(max_new_tokens=12, batch_size=8, ifbench_n=2, ifbench_max_new_tokens=16,
                          bigbench_per_task=1, kl_prompts=2, kl_max_new_tokens=8, first_turn_max_new_tokens=8),
    # The standard eval set (730 items; 157 first turns: 57 role_primed, 100 probed roles) per condition; see
    # docs/harm-evaluation.md for the time estimate.
    "standard": EvalSettings(max_new_tokens=48, batch_size=16, ifbench_n=16, ifbench_max_new_tokens=96,
                             bigbench_per_task=10, kl_prompts=8, kl_max_new_tokens=32, first_turn_max_new_tokens=48),
    # Replies as the reference implementation generates them: 256 new tokens sampled at T 0.7, top-p 0.9, here 4
    # samples per item whose streams are the same under every condition (paired). About 21x the reply tokens of
    # `standard` (4 samples x 256 / 48), so on a 2-core CPU it is a run of many hours per condition.
    "reference": EvalSettings(max_new_tokens=256, batch_size=16, ifbench_n=16, ifbench_max_new_tokens=96,
                              bigbench_per_task=10, kl_prompts=8, kl_max_new_tokens=32, first_turn_max_new_tokens=64,
                              temperature=0.7, top_p=0.9, samples=4),
    # CI-sized check of the sampled path: the smoke sizes with 2 samples per item.
    "smoke-sampled": EvalSettings(max_new_tokens=12, batch_size=8, ifbench_n=2, ifbench_max_new_tokens=16,
                                  bigbench_per_task=1, kl_prompts=2, kl_max_new_tokens=8, first_turn_max_new_tokens=8,
                                  temperature=0.7, top_p=0.9, samples=2),
}


SET_PRESETS = {"smoke": "smoke", "smoke-sampled": "smoke", "standard": "standard", "reference": "standard"}
"""The eval-set preset (harm_set.PRESETS) a run preset answers when no --set is given."""


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


Reply = tuple[str, int]  # (eval item id, sample index): one reply of a condition


def reply_stream(base: int, position: int, sample: int) -> int:
    """The stream seed of sample `sample` of the item at `position` in a chunk seeded `base` (the same under every
    condition, so conditions are paired reply by reply); sample 0 is generate's own stream_seed(base, position)."""
    first = stream_seed(base, position)
    return first if sample == 0 else stream_seed(first, SAMPLE_STREAM + sample)


@dataclass(frozen=True)
class FirstTurnChunk:
    """A job: one chunk of generated turns (harm_set.first_turn_key: a role_primed item's, or the one turn the probes
    of a role share) answered under one condition, `settings.samples` per turn, with their mean projections on the
    axis (None at the condition's intervened layers). Chunk k of the turns is seeded seed + k, sample s of the
    turn at position p draws from stream_seed(reply_stream(seed + k, p, s), FIRST_TURN_STREAM): never from the
    condition's name. Yields the records of the whole chunk (generated whole, like ReplyChunk, so a chunk torn by
    a crash is batched as in an uninterrupted run).
    """

    condition: Condition
    index: int
    turns: list[tuple[str, EvalItem]]  # (turn key, an item that opens with it)
    axis: Axis
    settings: EvalSettings

    def __call__(self, lm: LoadedModel) -> Iterator[list[dict[str, Any]]]:
        settings, base = self.settings, self.settings.seed + self.index
        pending = [(p, key, item, s) for p, (key, item) in enumerate(self.turns) for s in range(settings.samples)]
        interventions = self.condition.interventions()
        result = generate(lm, [first_turn_prompt(item) for _, _, item, _ in pending],
                          max_new_tokens=settings.first_turn_max_new_tokens, temperature=settings.temperature,
                          top_p=settings.top_p,
                          seed=[stream_seed(reply_stream(base, p, s), FIRST_TURN_STREAM) for p, _, _, s in pending],
                          batch_size=settings.batch_size, interventions=interventions)
        projections = _projections(result.captured_means(), self.axis, self.condition.layers)
        layer = measured_layer(self.axis, self.condition.layers)
        counts = _cap_counts(interventions)
        yield [{"condition": self.condition.name, "turn": key, "sample": s, "chunk": self.index, "text": text,
                "n_tokens": len(ids), "finished": finished, "layer": layer, "projection": row[layer],
                "projections": row, "cap_counts": counts}
               for (_, key, _, s), text, ids, finished, row in zip(pending, result.texts, result.token_ids,
                                                                    result.finished, projections)]


@dataclass(frozen=True)
class ReplyChunk:
    """A job: one chunk of eval items answered under one condition (seed + chunk index), `settings.samples` replies
    per item, each from its own stream (reply_stream); yields the records of the whole chunk (a chunk is generated
    whole, so a resumed run writes what an uninterrupted one would).

    first_turns: (turn key, sample) -> the stored first turn of every item of the chunk that has one.
    pc1: the PC1 direction whose projections the replies also record (given for the uncapped condition).
    """

    condition: Condition
    index: int
    items: list[EvalItem]
    axis: Axis
    settings: EvalSettings
    pc1: Axis | None = None
    first_turns: dict[Reply, dict[str, Any]] = field(default_factory=dict)

    def _first(self, item: EvalItem, sample: int) -> dict[str, Any] | None:
        return None if item.generated_turn is None else self.first_turns[(first_turn_key(item), sample)]

    def __call__(self, lm: LoadedModel) -> Iterator[list[dict[str, Any]]]:
        condition, settings = self.condition, self.settings
        replies = [(k, item, s, self._first(item, s)) for k, item in enumerate(self.items)
                   for s in range(settings.samples)]
        layer = measured_layer(self.axis, condition.layers)
        interventions = condition.interventions()
        chats = [conversation(item, None if first is None else first["text"]) for _, item, _, first in replies]
        result = generate(lm, chats, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          top_p=settings.top_p, seed=[reply_stream(settings.seed + self.index, k, s)
                                                      for k, _, s, _ in replies],
                          batch_size=settings.batch_size, interventions=interventions)
        means = result.captured_means()
        projections = _projections(means, self.axis, condition.layers)
        extra = ([{"pc1_projections": row} for row in _projections(means, self.pc1, [])]
                 if self.pc1 is not None else [{} for _ in replies])
        counts = _cap_counts(interventions)
        turn_keys = ("text", "n_tokens", "finished", "projection", "projections")
        yield [
            {"condition": condition.name, "item": item.id, "sample": s, "kind": item.kind, "family": item.family,
             "chunk": self.index, "text": text, "n_tokens": len(ids), "finished": finished,
             "first_turn": None if first is None else {k: first[k] for k in turn_keys},
             "layer": layer, "projection": row[layer], "projections": row, "cap_counts": counts, **more}
            for (_, item, s, first), text, ids, finished, row, more in zip(replies, result.texts, result.token_ids,
                                                                           result.finished, projections, extra)]


def _reply(record: Mapping[str, Any]) -> Reply:
    return str(record["item"]), int(record.get("sample", 0))


def _turn(record: Mapping[str, Any]) -> Reply:
    return str(record["turn"]), int(record.get("sample", 0))


def step_first_turns(store: RunStore, executor: Executor, axis: Axis, conditions: Sequence[Condition],
                     items: Sequence[EvalItem], settings: EvalSettings,
                     progress: bool) -> dict[tuple[str, Reply], dict[str, Any]]:
    """Generate every missing (condition, turn, sample) first turn (one job per condition and chunk of turns, cut by
    prompt length like the replies, one append per job); returns every stored first turn by (condition, (turn,
    sample)). A role's probes share one turn, so it is written once however many requests follow it."""
    stored: dict[tuple[str, Reply], dict[str, Any]] = {}
    for r in store.records("first_turns"):
        stored.setdefault((r["condition"], _turn(r)), r)
    openers: dict[str, EvalItem] = {}
    for item in items:
        if item.generated_turn is not None:
            openers.setdefault(first_turn_key(item), item)
    if not openers:
        return stored
    keys = list(openers)
    [(_, lengths)] = list(executor.run_jobs([PromptLengths([first_turn_prompt(openers[k]) for k in keys])]))
    order = sorted(range(len(keys)), key=lambda k: lengths[k])
    chunks = [[(keys[k], openers[keys[k]]) for k in order[start : start + settings.batch_size]]
              for start in range(0, len(order), settings.batch_size)]
    wanted = [[(key, s) for key, _ in chunk for s in range(settings.samples)] for chunk in chunks]
    jobs = [FirstTurnChunk(condition, index, chunk, axis, settings)
            for condition in conditions for index, chunk in enumerate(chunks)
            if not all((condition.name, t) in stored for t in wanted[index])]
    bar = tqdm(total=len(chunks) * len(conditions), initial=len(chunks) * len(conditions) - len(jobs),
               desc=f"first turns ({executor.name})", unit="batch", disable=not progress)
    for _, records in executor.run_jobs(jobs):
        new = [r for r in records if (r["condition"], _turn(r)) not in stored]
        store.append("first_turns", new)
        stored.update({(r["condition"], _turn(r)): r for r in new})
        bar.update(1)
    bar.close()
    return stored


def step_replies(store: RunStore, executor: Executor, axis: Axis, conditions: Sequence[Condition],
                 items: Sequence[EvalItem], settings: EvalSettings, pc1: Axis | None, progress: bool) -> None:
    """Generate every missing first turn (step_first_turns), then every missing (condition, item, sample) reply:
    one job per (condition, chunk), one append per chunk."""
    firsts = step_first_turns(store, executor, axis, conditions, items, settings, progress)
    done: dict[str, set[Reply]] = {c.name: set() for c in conditions}
    for r in store.records("replies"):
        done.setdefault(r["condition"], set()).add(_reply(r))
    [(_, lengths)] = list(executor.run_jobs([PromptLengths([list(item.messages) for item in items])]))
    chunks = chunks_by_length(lengths, items, settings.batch_size)
    wanted = [[(item.id, s) for item in chunk for s in range(settings.samples)] for chunk in chunks]
    turns = [{(first_turn_key(i), s) for i in chunk if i.generated_turn is not None for s in range(settings.samples)}
             for chunk in chunks]
    jobs = [ReplyChunk(condition, index, chunk, axis, settings, pc1 if condition.name == UNCAPPED else None,
                       {t: firsts[(condition.name, t)] for t in turns[index]})
            for condition in conditions for index, chunk in enumerate(chunks)
            if not all(u in done[condition.name] for u in wanted[index])]
    bar = tqdm(total=len(chunks) * len(conditions), initial=len(chunks) * len(conditions) - len(jobs),
               desc=f"replies ({executor.name})", unit="batch", disable=not progress)
    for _, records in executor.run_jobs(jobs):
        store.append("replies", [r for r in records if _reply(r) not in done[r["condition"]]])
        bar.update(1)
    bar.close()
    store.mark_step("replies", {"done": True, "n": len(items) * len(conditions) * settings.samples})


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
    """Judge every reply not yet judged: harm kinds (JUDGED_KINDS) by `judge`, benign persona replies by the
    refusal cue.

    Judged in fixed batches of JUDGE_BATCH over all harm replies in (condition, item, sample) order, whatever
    order the replies were written in (a batching judge pads, which moves its scores by ~1e-7): the same
    batches after any executor and after any resume. A batch left partly judged (a write torn by a
    crash) is judged again whole and only its missing verdicts are appended. Appended batch by batch,
    so a judge failing midway keeps what it judged.
    """
    from persona_axis.evals.harm_classifier import refusal_cue

    key = lambda r, judge_id: (r["condition"], *_reply(r), judge_id)  # noqa: E731
    judged = {key(r, r["judge"]) for r in store.records("verdicts")}
    replies = store.records("replies")
    benign = [r for r in replies if r["kind"] == "benign_persona" and key(r, REFUSAL_JUDGE) not in judged]
    store.append("verdicts", [{"condition": r["condition"], "item": r["item"], "sample": _reply(r)[1],
                               "judge": REFUSAL_JUDGE, "refused": refusal_cue(r["text"])} for r in benign])
    harm = sorted((r for r in replies if r["kind"] in JUDGED_KINDS), key=lambda r: (r["condition"], *_reply(r)))
    missing = lambda r: key(r, judge.id) not in judged  # noqa: E731
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
        store.append("verdicts", [{"condition": r["condition"], "item": r["item"], "sample": _reply(r)[1],
                                   "judge": judge.id, "harmful": v.harmful, "score": v.score,
                                   "rationale": v.rationale} for r, v in new])
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
