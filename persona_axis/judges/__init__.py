"""Judges of role adherence: an OpenAI-compatible HTTP judge and an offline judge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from persona_axis.catalog import Role
from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import SCORES, Judge, JudgeItem, Verdict

__all__ = ["SCORES", "Judge", "JudgeItem", "Verdict", "make_judge"]


def make_judge(kind: str, cache_dir: Path | None = None, url: str | None = None, model: str | None = None,
               key_env: str = "OPENAI_API_KEY", threshold: float | None = None,
               traits: Sequence[Role] | None = None) -> Judge:
    """Build a judge by kind: "offline" (no network), "offline-learned" (no network; logistic regression
    trained on the labelled replies, persona_axis/judges/learned.py) or "openai" (any chat-completions endpoint).

    traits: build the judge for trait-expression items (kind "trait"); the offline judge then
    measures how specifically a reply resembles its trait among these traits, not among roles.
    """
    if kind == "offline":
        from persona_axis.judges.offline import DEFAULT_THRESHOLD, OfflineJudge

        reference = [(t.name, t.description) for t in traits] if traits is not None else None
        return OfflineJudge(DEFAULT_THRESHOLD if threshold is None else threshold, reference=reference,
                            traits=traits is not None)
    if kind == "offline-learned":
        if traits is not None:  # no trait labels to learn from: the offline judge's trait rules, under their own id
            return make_judge("offline", threshold=threshold, traits=traits)
        from persona_axis.judges.learned import LearnedJudge

        return LearnedJudge()
    if kind == "openai":
        from persona_axis.apps.chat_api import endpoint_base_url
        from persona_axis.judges.http import OpenAIJudge

        base_url = endpoint_base_url(url, model, "judge")
        return OpenAIJudge(base_url, str(model), api_key_env=key_env, cache_dir=cache_dir)
    raise PersonaAxisError(f"unknown judge {kind!r}: use offline, offline-learned or openai")
