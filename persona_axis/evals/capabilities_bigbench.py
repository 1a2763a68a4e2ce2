"""BIG-bench multiple choice scored by log-likelihood: does an intervention cost knowledge or reasoning?

Tasks (the default subset, one or two per kind; files under persona_axis/data/evals/, copied
unmodified from the `bigbench==1.0.0` sdist, Apache-2.0, provenance in bigbench_sources.json —
pip refuses that package, even `pip download --no-deps`, because it declares a local-file dependency):
  arithmetic/1_digit_multiplication  maths      100 examples, 5–7 choices (numbers, "banana", "house")
  general_knowledge                  knowledge  70 examples, 4–13 choices
  logical_deduction/three_objects    reasoning  300 examples, 3 choices
  physical_intuition                 physical reasoning  81 examples, 2–5 choices

Format (chat): the user turn is the task's `task_prefix` + the example's input, followed, when the
task sets `append_choices_to_input` (BIG-bench's default), by one "choice: <text>" line per
option; each choice is scored as the assistant's reply, zero-shot: the summed log-probability of
its tokens after the chat prompt (no length normalisation, no end-of-turn token). The prediction
is the highest-scoring choice; an example's score is the target score of that choice (0 or 1 here).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm

from persona_axis.decode.interventions import InterventionMap, steer
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

DEFAULT_TASKS = ("arithmetic/1_digit_multiplication", "general_knowledge", "logical_deduction/three_objects",
                 "physical_intuition")


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice item: `question` is the full user turn; scores[i] is the target score of choices[i]."""

    task: str
    index: int
    question: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass
class BigBenchResult:
    """accuracy: mean example score over all tasks (micro average); per_task: {task: {"accuracy", "n"}}."""

    accuracy: float
    n: int
    per_task: dict[str, dict[str, float]]
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _data(name: str) -> Any:
    return json.loads((resources.files("persona_axis") / "data" / "evals" / name).read_text(encoding="utf-8"))


def bigbench_sources() -> dict[str, Any]:
    """Provenance of the shipped task files: package, version, licence, and per task its source path and sha256."""
    return dict(_data("bigbench_sources.json"))


def load_task(task: str) -> list[MCExample]:
    """Every multiple-choice example of a shipped task (e.g. "general_knowledge"), in file order."""
    shipped = bigbench_sources()["tasks"]
    if task not in shipped:
        raise PersonaAxisError(f"unknown BIG-bench task {task!r}: shipped tasks are {', '.join(shipped)}")
    spec = _data(shipped[task]["file"])
    examples = []
    for index, row in enumerate(spec["examples"]):
        if "target_scores" not in row:
            continue
        choices = tuple(row["target_scores"])
        question = spec.get("task_prefix", "") + row["input"]
        if spec.get("append_choices_to_input", True):
            question += "".join(f"\nchoice: {c}" for c in choices)
        examples.append(MCExample(task, index, question, choices,
                                  tuple(float(row["target_scores"][c]) for c in choices)))
    return examples


def select_examples(n_per_task: int, tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0) -> list[MCExample]:
    """n_per_task examples of each task (all of a smaller task), drawn without replacement by random.Random(seed)."""
    if n_per_task < 1:
        raise PersonaAxisError("n_per_task must be at least 1")
    chosen: list[MCExample] = []
    for task in tasks:
        examples = load_task(task)
        chosen += random.Random(seed).sample(examples, min(n_per_task, len(examples)))
    return chosen


def choice_logliks(lm: LoadedModel, examples: Sequence[MCExample], interventions: InterventionMap | None = None,
                   batch_size: int = 8, *, progress: bool = False) -> list[list[float]]:
    """Summed log-probability (nats) of each choice as the assistant's reply to the example's question.

    Examples are sorted by prompt length and run `batch_size` at a time under
    `steer(lm, interventions)` in two forward passes (see `_batch_logliks`): an intervention with
    positions="all" acts on every token; one with positions="last" only on each pass's last column.
    """
    prompts = [lm.prompt_ids([{"role": "user", "content": e.question}]) for e in examples]
    tails = [[lm.tokenizer(c, add_special_tokens=False).input_ids for c in e.choices] for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    out: list[list[float]] = [[] for _ in examples]
    with steer(lm, interventions or {}):
        for start in tqdm(range(0, len(order), batch_size), desc="bigbench", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            for i, scores in zip(rows, _batch_logliks(lm, [prompts[i] for i in rows], [tails[i] for i in rows])):
                out[i] = scores
    return out


@torch.inference_mode()
def _batch_logliks(lm: LoadedModel, prompts: list[list[int]], tails: list[list[list[int]]]) -> list[list[float]]:
    """Per prompt, the summed log-probability of each of its continuations (token id lists).

    The prompts run once, left-padded, filling a KV cache; the cache rows are then repeated per
    continuation (the beam-search reorder) and all continuations run in one right-padded pass, so
    a prompt costs one forward however many choices it has.
    """
    device, pad = lm.device, lm.tokenizer.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(prompts):
        ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    first = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True, logits_to_keep=1)
    first_logp = first.logits[:, -1].float().log_softmax(-1)  # [prompts, vocab]: the first continuation token
    owner = torch.tensor([r for r, choices in enumerate(tails) for _ in choices])
    flat = [tail for choices in tails for tail in choices]
    cache = first.past_key_values
    cache.reorder_cache(owner.to(device))
    length = max(1, max(map(len, flat)))
    cont = torch.full((len(flat), length), pad, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for r, tail in enumerate(flat):
        cont[r, : len(tail)], cont_mask[r, : len(tail)] = torch.tensor(tail, dtype=torch.long), 1
    positions = torch.tensor([len(prompts[o]) for o in owner.tolist()])[:, None] + torch.arange(length)
    rest = lm.model(input_ids=cont.to(device), attention_mask=torch.cat([mask[owner], cont_mask], 1).to(device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True)
    rest_logp = rest.logits[:, :-1].float().log_softmax(-1)  # [continuations, length-1, vocab]: tokens 1..
    totals = []
    for r, (o, tail) in enumerate(zip(owner.tolist(), flat)):
        if not tail:
            totals.append(0.0)
            continue
        later = rest_logp[r, torch.arange(len(tail) - 1), torch.tensor(tail[1:], dtype=torch.long)].sum()
        totals.append(float(first_logp[o, tail[0]] + later))
    out, k = [], 0
    for choices in tails:
        out.append(totals[k : k + len(choices)])
        k += len(choices)
    return out


def bigbench(lm: LoadedModel, n_per_task: int = 40, *, tasks: Sequence[str] = DEFAULT_TASKS,
             interventions: InterventionMap | None = None, seed: int = 0, batch_size: int = 8,
             progress: bool = False) -> BigBenchResult:
    """Score n_per_task selected examples of each task; accuracy per task and overall."""
    examples = select_examples(n_per_task, tasks, seed)
    return grade(examples, choice_logliks(lm, examples, interventions, batch_size, progress=progress))


def grade(examples: Sequence[MCExample], logliks: Sequence[Sequence[float]]) -> BigBenchResult:
    """Pick each example's likeliest choice (the first on ties) and score it; accuracy per task and overall."""
    if not examples or len(examples) != len(logliks):
        raise PersonaAxisError(f"cannot grade {len(logliks)} score lists against {len(examples)} examples")
    items: list[dict[str, Any]] = []
    for example, scores in zip(examples, logliks):
        best = max(range(len(scores)), key=scores.__getitem__)
        items.append({"task": example.task, "index": example.index, "choice": best,
                      "score": example.scores[best], "logliks": list(scores)})
    per_task = {}
    for task in dict.fromkeys(e.task for e in examples):
        mine = [item["score"] for item in items if item["task"] == task]
        per_task[task] = {"accuracy": sum(mine) / len(mine), "n": len(mine)}
    return BigBenchResult(accuracy=sum(i["score"] for i in items) / len(items), n=len(items), per_task=per_task,
                          items=items)
