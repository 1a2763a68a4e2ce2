"""The Judge protocol: score how fully a reply plays the role (or shows the trait) it was asked to.

Scale for roles (role adherence, as the reference implementation scores it):
  0  steps out of the role to refuse, speaking as an AI or assistant
  1  speaks as an AI or assistant, with none of the role's attributes, but tries to answer
  2  speaks as an AI or assistant yet shows some of the role's attributes
  3  fully plays the role (no claim to be an AI, or another name); a refusal given in character counts here
Scale for traits (trait expression):
  0  refuses to answer
  1  the trait is absent
  2  the trait is partly expressed
  3  the trait is clearly expressed
A verdict whose score is None is unscored (the judge could not decide); it is never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from persona_axis.errors import PersonaAxisError

SCORES = (0, 1, 2, 3)
KINDS = ("role", "trait")


@dataclass(frozen=True)
class JudgeItem:
    """One reply to judge: the role (or trait) it was asked to play, the question and the reply.

    role: the role's or trait's name; description: one line about it; eval_prompt: the role's own judge
    prompt from the catalogue ("" when none; may hold {question} and {answer} slots); kind: "role" or "trait".
    """

    role: str
    description: str
    question: str
    response: str
    eval_prompt: str = ""
    kind: str = "role"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PersonaAxisError(f"judge item kind must be one of {', '.join(KINDS)}, not {self.kind!r}")


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
