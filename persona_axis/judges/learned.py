"""A learned offline role judge: multinomial logistic regression on cheap features of (role, question, reply).

Features per role item (`FEATURES`, in this order; `role_features` computes them):
  z                 the offline judge's role specificity (persona_axis.judges.offline), against the catalogue's roles
  cos_role          cosine of the reply's and the role's ("name: description") MiniLM embeddings
  cos_question      cosine of the reply's and the question's embeddings (stock replies restate the question)
  refusal, ai_identity, assistant_voice   the offline judge's regular-expression cues (0/1)
  role_named        a word of the role's name appears in the reply (prefix match: "gambler" finds "gambling")
  role_claim        the reply claims the role ("As a cyclops", "I am a ... hermit", "we are the ... colony")
  description_overlap   share of the description's longer words found in the reply
  first_person      share of the reply's words that are I/me/my/we/us/our
  log_words         log(1 + words in the reply)
  list_items, however, second_person, tips   the helper's style: lines opening "1." or "-", "however",
                    the share of you/your, "here are" / "here's" / "tips"
  plus, when the fitted model asks for it (`embedding_block`), the reply's 384-d embedding times the role's.
Features are standardised with the shipped means and scales, then the shipped coefficients give P(0..3).
Decision: 3 when P(3) >= `p3_threshold` (tuned by cross-validation on fold A for precision), otherwise the
most probable of 0-2. Only fold A of the four labelled files trained it; docs/offline-judge.md reports fold B.
The coefficients ship as JSON (persona_axis/data/role_judge_logreg.json, nothing pickled) and
scripts/train_role_judge.py rebuilds them. Trait items fall back to the offline judge's trait scoring.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import SCORES, JudgeItem, Verdict
from persona_axis.judges.offline import AI_IDENTITY, ASSISTANT_VOICE, REFUSAL, OfflineJudge, load_embedder, role_text

WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "data" / "role_judge_logreg.json"
JUDGE_VERSION = 3  # part of the judge's id: runs scored by another version are re-judged
FEATURES = ("z", "cos_role", "cos_question", "refusal", "ai_identity", "assistant_voice", "role_named",
            "role_claim", "description_overlap", "first_person", "log_words", "list_items", "however",
            "second_person", "tips")
EMBED_DIM = 384
Embed = Callable[[list[str]], np.ndarray]

_WORD = re.compile(r"[a-z']+")
_FIRST_PERSON = {"i", "i'm", "i've", "i'd", "i'll", "me", "my", "mine", "myself", "we", "we're", "we've", "us", "our",
                 "ours", "ourselves"}
_SECOND_PERSON = {"you", "your", "you're", "yours", "yourself"}
_LIST_ITEM = re.compile(r"(?m)^\s*(?:\d+\.|[-*•])\s")
_TIPS = re.compile(r"\b(?:here are|here's|some tips|tips)\b")
_NAME_STOP = {"the", "and", "old", "new", "of", "a", "an", "to", "in", "on"}


def _prefix(word: str) -> str:
    """A crude stem: the word less up to two trailing letters, never shorter than 4 letters (or the word)."""
    return word[:max(4, len(word) - 2)] if len(word) > 4 else word


def _name_words(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").split("_") if len(w) >= 3 and w not in _NAME_STOP]


def lexical_features(item: JudgeItem) -> list[float]:
    """The cue and word features of one item (every feature of FEATURES but z and the two cosines)."""
    text = item.response.strip()
    lower = text.lower()
    words = _WORD.findall(lower)
    stems = [_prefix(w) for w in _name_words(item.role)]
    named = any(re.search(rf"\b{re.escape(s)}", lower) for s in stems)
    claim = bool(stems) and re.search(
        r"\b(?:as|i am|i'm|we are|we're|i was|being)\s+(?:a|an|the|one|your)?\s*(?:[\w-]+\s+){0,3}?(?:"
        + "|".join(re.escape(s) for s in stems) + ")", lower) is not None
    long_words = {w for w in _WORD.findall(item.description.lower()) if len(w) >= 6}
    overlap = (sum(1 for w in long_words if re.search(rf"\b{re.escape(_prefix(w))}", lower)) / len(long_words)
               if long_words else 0.0)
    return [float(REFUSAL.search(text[:200]) is not None), float(AI_IDENTITY.search(text) is not None),
            float(ASSISTANT_VOICE.search(text) is not None), float(named), float(claim), overlap,
            sum(1 for w in words if w in _FIRST_PERSON) / max(1, len(words)), math.log1p(len(words)),
            float(len(_LIST_ITEM.findall(text))), float("however" in lower),
            sum(1 for w in words if w in _SECOND_PERSON) / max(1, len(words)), float(_TIPS.search(lower) is not None)]


def role_features(items: Sequence[JudgeItem], embed: Embed, reference: Sequence[tuple[str, str]],
                  embedding_block: bool) -> np.ndarray:
    """Features [n, len(FEATURES) (+ 384 with embedding_block)] of role items; `embed` returns unit vectors.

    reference: the (name, description) roles the z-score compares with (the items' own roles are added).
    """
    if not items:
        return np.zeros((0, len(FEATURES) + (EMBED_DIM if embedding_block else 0)), dtype=np.float64)
    names = list({role_text(n, d): None for n, d in reference} | {role_text(i.role, i.description): None
                                                                   for i in items})
    roles = embed(names).astype(np.float64)  # [roles, 384]
    replies = embed([i.response for i in items]).astype(np.float64)  # [n, 384]
    questions = embed([i.question for i in items]).astype(np.float64)
    own_index = [names.index(role_text(i.role, i.description)) for i in items]
    similarity = replies @ roles.T  # [n, roles]
    own = similarity[np.arange(len(items)), own_index]
    z = (own - similarity.mean(1)) / np.maximum(similarity.std(1, ddof=1), 1e-6)
    cos_question = (replies * questions).sum(1)
    lexical = np.array([lexical_features(i) for i in items], dtype=np.float64)
    columns = [z[:, None], own[:, None], cos_question[:, None], lexical]
    if embedding_block:
        columns.append(replies * roles[own_index])
    return np.hstack(columns)


def decide(probabilities: np.ndarray, p3_threshold: float) -> np.ndarray:
    """Scores [n] from P(0..3) [n, 4]: 3 when P(3) >= p3_threshold, else the most probable of 0-2."""
    if probabilities.size == 0:
        return np.zeros(0, dtype=np.int64)
    below = probabilities[:, :3].argmax(1)
    return np.where(probabilities[:, 3] >= p3_threshold, 3, below)


def load_weights(path: Path = WEIGHTS_FILE) -> dict[str, Any]:
    """The shipped model: feature names, standardisation, coefficients [4, d], intercepts [4], p3_threshold."""
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
        coef = np.asarray(params["coef"], dtype=np.float64)
        dims = len(FEATURES) + (EMBED_DIM if params["embedding_block"] else 0)
        ok = (params["features"] == list(FEATURES) and coef.shape == (len(SCORES), dims)
              and len(params["intercept"]) == len(SCORES) and len(params["mean"]) == dims
              and len(params["scale"]) == dims and 0.0 <= float(params["p3_threshold"]) <= 1.0)
    except (OSError, ValueError, KeyError, TypeError):
        raise PersonaAxisError(f"role judge weights unreadable at {path}: reinstall persona-axis") from None
    if not ok:
        raise PersonaAxisError(f"role judge weights at {path} do not match this version's features: reinstall")
    return params


def probabilities(x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """P(score 0..3) [n, 4] of raw features x [n, d] under the shipped (or freshly fitted) parameters."""
    scaled = (x - np.asarray(params["mean"])) / np.asarray(params["scale"])
    logits = scaled @ np.asarray(params["coef"], dtype=np.float64).T + np.asarray(params["intercept"])
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


class LearnedJudge:
    """Logistic-regression role judge (id offline:minilm-logreg-v3); works offline from the shipped JSON.

    reference: the roles the z-score compares with (default: the built-in catalogue's roles). Trait items
    are scored by the offline judge's trait rules (persona_axis.judges.offline.OfflineJudge, kind "trait").
    """

    def __init__(self, path: Path = WEIGHTS_FILE, reference: Sequence[tuple[str, str]] | None = None,
                 embedder: object | None = None, batch_size: int = 64) -> None:
        self.params = load_weights(path)
        self.id = f"offline:minilm-logreg-v{JUDGE_VERSION}"
        self._reference = list(reference) if reference is not None else None
        self._embedder = embedder
        self._batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}
        self._trait_judge: OfflineJudge | None = None

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Unit embeddings [n, 384]; each distinct text is embedded once per judge (role texts recur)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if self._embedder is None:
                self._embedder = load_embedder()
            vectors = self._embedder.encode(  # type: ignore[attr-defined]
                missing, batch_size=self._batch_size, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update(zip(missing, np.asarray(vectors, dtype=np.float32)))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, EMBED_DIM), np.float32)

    def _reference_roles(self) -> list[tuple[str, str]]:
        if self._reference is None:
            from persona_axis.catalog import load_catalog

            self._reference = [(r.name, r.description) for r in load_catalog().roles]
        return self._reference

    def role_probabilities(self, items: Sequence[JudgeItem]) -> np.ndarray:
        """P(score 0..3) [n, 4] for role items."""
        x = role_features(items, self._embed, self._reference_roles(), bool(self.params["embedding_block"]))
        return probabilities(x, self.params)

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item: empty replies unscored, trait items by the offline trait rules, roles learned."""
        verdicts: list[Verdict | None] = [None] * len(items)
        roles = [k for k, i in enumerate(items) if i.kind == "role" and i.response.strip()]
        traits = [k for k, i in enumerate(items) if i.kind == "trait" and i.response.strip()]
        for k, item in enumerate(items):
            if not item.response.strip():
                verdicts[k] = Verdict(None, "unscored: empty reply", self.id)
        if roles:
            p = self.role_probabilities([items[k] for k in roles])
            for k, row, score in zip(roles, p, decide(p, float(self.params["p3_threshold"]))):
                verdicts[k] = Verdict(int(score), "P(0..3) " + " ".join(f"{v:.2f}" for v in row), self.id)
        if traits:
            if self._trait_judge is None:
                from persona_axis.catalog import load_catalog

                reference = [(t.name, t.description) for t in load_catalog().traits]
                self._trait_judge = OfflineJudge(reference=reference, embedder=self._embedder, traits=True)
            for k, verdict in zip(traits, self._trait_judge.score([items[k] for k in traits])):
                verdicts[k] = Verdict(verdict.score, f"trait rules (offline judge): {verdict.rationale}", self.id)
        return [v for v in verdicts if v is not None]
