"""The Judge protocol: score how fully a reply plays the role it was asked to play.

Scale (role adherence):
  0  refused to answer
  1  says it cannot be the role (or answers as an AI) but offers help
  2  identifies as an AI yet shows some of the role's attributes
  3  fully plays the role
A verdict whose score is None is unscored (the judge could not decide); it is never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SCORES = (0, 1, 2, 3)


@dataclass(frozen=True)
class JudgeItem:
    """One reply to judge: the role it was asked to play (name + one-line description), the question, the reply."""

    role: str
    description: str
    question: str
    response: str


@dataclass(frozen=True)
class Verdict:
    """A judge's score (0-3, or None when unscored), a short rationale, and the judge's id."""

    score: int | None
    rationale: str
    judge: str


class Judge(Protocol):
    """Anything with an `id` and a batch `score` method that returns one verdict per item, in order."""

    id: str

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...
