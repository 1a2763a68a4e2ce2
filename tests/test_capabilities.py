"""Capability checks: BIG-bench log-likelihood scoring, IFBench checkers and generation, next-token KL."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.decode.interventions import Addition
from persona_axis.errors import PersonaAxisError
from persona_axis.evals.capabilities import next_token_kl
from persona_axis.evals.capabilities_bigbench import (
    DEFAULT_TASKS,
    MCExample,
    bigbench,
    bigbench_sources,
    choice_logliks,
    grade,
    load_task,
    select_examples,
)
from persona_axis.evals.capabilities_ifbench import (
    NEEDS_NLTK_DATA,
    IFBenchPrompt,
    ifbench,
    ifbench_prompts,
    is_supported,
    load_ifbench,
    score_reply,
    select_prompts,
)
from persona_axis.model.loading import LoadedModel, load_model, wrap_model


def _token_boost(lm: LoadedModel, word: str, coef: float = 200.0) -> dict[int, Addition]:
    """Add a large multiple of `word`'s unembedding row at the last layer: that token becomes the likeliest."""
    (token,) = lm.tokenizer(word, add_special_tokens=False).input_ids
    row = lm.model.get_output_embeddings().weight[token].detach()
    return {lm.n_layers - 1: Addition(row / row.norm(), coef)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_choice_logliks_match_a_separate_unpadded_pass(family: str, tokenizer: Any) -> None:
    lm = wrap_model(tiny_model(family), tokenizer, name=f"tiny-{family}")
    examples = [MCExample("t", 0, "What is two times three?", ("six", "seven hundred and two", "6"), (1.0, 0.0, 1.0)),
                MCExample("t", 1, "Name a colour, please, in one word only.", ("red", "a"), (1.0, 0.0))]
    batched = choice_logliks(lm, examples, batch_size=2)  # prompts of two lengths, choices of several
    for example, scores in zip(examples, batched):
        prompt = lm.tokenizer(lm.chat_prompt([{"role": "user", "content": example.question}]),
                              add_special_tokens=False).input_ids
        for choice, score in zip(example.choices, scores):
            tail = lm.tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = lm.model(input_ids=torch.tensor([prompt + tail])).logits[0].log_softmax(-1)
            expected = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(tail))
            assert score == pytest.approx(expected, abs=1e-4)


def test_scoring_picks_the_likeliest_choice_and_interventions_change_it(tiny_llama: LoadedModel) -> None:
    example = MCExample("synthetic", 0, "Pick one.", ("no", "yes", "maybe"), (0.0, 1.0, 0.0))
    plain = choice_logliks(tiny_llama, [example])
    boosted = choice_logliks(tiny_llama, [example], _token_boost(tiny_llama, "yes"))
    assert boosted != plain
    assert max(range(3), key=boosted[0].__getitem__) == 1
    result = grade([example], boosted)
    assert result.accuracy == 1.0 and result.items[0]["choice"] == 1
    assert grade([example], [[0.0, -1.0, -2.0]]).accuracy == 0.0  # "no" likeliest: wrong
    assert grade([example, example], [[-3.0, -1.0, -2.0], [-1.0, -1.0, -2.0]]).to_json()["per_task"] == {
        "synthetic": {"accuracy": 0.5, "n": 2}}  # a tie goes to the first choice


def test_shipped_tasks_load_with_provenance() -> None:
    sources = bigbench_sources()
    assert sources["version"] == "1.0.0" and set(sources["tasks"]) == set(DEFAULT_TASKS)
    for task in DEFAULT_TASKS:
        examples = load_task(task)
        assert len(examples) == sources["tasks"][task]["examples"]
        assert all(len(e.choices) >= 2 and max(e.scores) == 1.0 for e in examples)
    first = load_task("general_knowledge")[0]
    assert first.question.startswith("How many legs do horses have?") and "\nchoice: four" in first.question
    assert load_task("logical_deduction/three_objects")[0].question.startswith("The following paragraphs")
    assert "choice:" not in load_task("logical_deduction/three_objects")[0].question  # choices not appended there
    picked = select_examples(3, seed=0)
    assert len(picked) == 12 and picked == select_examples(3, seed=0) and picked != select_examples(3, seed=1)
    with pytest.raises(PersonaAxisError):
        load_task("sources")


def test_bigbench_runs_end_to_end_on_a_tiny_model(tiny_llama: LoadedModel) -> None:
    result = bigbench(tiny_llama, n_per_task=2, tasks=["general_knowledge", "physical_intuition"])
    assert result.n == 4 and set(result.per_task) == {"general_knowledge", "physical_intuition"}
    assert 0.0 <= result.accuracy <= 1.0 and len(result.to_json()["items"]) == 4


def _prompt(key: str) -> IFBenchPrompt:
    return next(p for p in load_ifbench() if p.key == key)


def test_prompts_chosen_elsewhere_are_refused_where_their_checkers_cannot_run(
        tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_axis.evals import capabilities_ifbench

    needs_data = next(p for p in load_ifbench() if NEEDS_NLTK_DATA & set(p.instruction_ids))
    monkeypatch.setattr(capabilities_ifbench, "_have_nltk_data", lambda: False)  # a machine without the NLTK data
    with pytest.raises(PersonaAxisError, match=f"IFBench prompts {needs_data.key} need checkers"):
        ifbench_prompts(tiny_llama, [_prompt("41"), needs_data], max_new_tokens=2)
    assert ifbench_prompts(tiny_llama, [_prompt("41")], max_new_tokens=2).n_prompts == 1


def test_ifbench_checkers_on_hand_written_replies() -> None:
    keywords = _prompt("0")  # kaleidoscope x1, nebula x2, whisper x3, labyrinth x5, paradox x7
    words = ["kaleidoscope"] + ["nebula"] * 2 + ["whisper"] * 3 + ["labyrinth"] * 5
    assert score_reply(keywords, " ".join(words + ["paradox"] * 7))[0].strict
    assert not score_reply(keywords, " ".join(words + ["paradox"] * 6))[0].strict
    count = _prompt("41")  # between 71 and 73 words
    assert score_reply(count, " ".join(["word"] * 72))[0].strict
    assert not score_reply(count, " ".join(["word"] * 10))[0].loose
    nospace = _prompt("296")  # no whitespace at all
    (strict_only,) = score_reply(nospace, "Notallsetsareclasses.")
    assert strict_only.strict and strict_only.loose
    (loose_only,) = score_reply(nospace, "Sure, here it is:\nNotallsetsareclasses.")  # loose drops the first line
    assert not loose_only.strict and loose_only.loose
    assert not score_reply(nospace, "")[0].loose


def test_ifbench_selection_is_seeded_and_offline() -> None:
    prompts = load_ifbench()
    assert len(prompts) == 294
    picked = select_prompts(10, seed=0)
    assert picked == select_prompts(10, seed=0) and picked != select_prompts(10, seed=1)
    assert all(is_supported(p) for p in picked)
    needs_data = [p for p in prompts if NEEDS_NLTK_DATA & set(p.instruction_ids)]
    assert needs_data and all(is_supported(p) == is_supported(needs_data[0]) for p in needs_data)
    with pytest.raises(PersonaAxisError):
        select_prompts(len(prompts) + 1)


def test_ifbench_generates_and_scores_under_interventions(tiny_llama: LoadedModel) -> None:
    plain = ifbench(tiny_llama, n=2, max_new_tokens=4)
    boosted = ifbench(tiny_llama, n=2, max_new_tokens=4, interventions=_token_boost(tiny_llama, "yes"))
    assert plain.n_prompts == 2 and plain.n_instructions >= 2
    assert [i["key"] for i in plain.items] == [i["key"] for i in boosted.items]
    assert [i["reply"] for i in plain.items] != [i["reply"] for i in boosted.items]
    assert all(i["reply"].strip().startswith("yes") for i in boosted.items)
    assert 0.0 <= plain.prompt_strict <= plain.prompt_loose <= 1.0


def test_next_token_kl_is_zero_without_and_positive_with_a_strong_addition(tiny_llama: LoadedModel) -> None:
    conversations = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "What is a cat?"}]]
    push = {1: Addition(torch.randn(tiny_llama.hidden_size, generator=torch.Generator().manual_seed(0)), 20.0)}
    none, strong = next_token_kl(tiny_llama, conversations, [{}, push], max_new_tokens=6)
    (unbatched,) = next_token_kl(tiny_llama, conversations, [push], max_new_tokens=6, batch_size=1)
    assert unbatched.kl == pytest.approx(strong.kl, rel=1e-4)  # padding changes nothing
    assert unbatched.top1_agreement == strong.top1_agreement
    assert none.kl == pytest.approx(0.0, abs=1e-6) and none.top1_agreement == 1.0
    assert strong.kl > 1e-3 and strong.top1_agreement < 1.0
    assert none.n_positions == strong.n_positions > 2 * 6 and strong.to_json()["n_conversations"] == 2
    with pytest.raises(PersonaAxisError):
        next_token_kl(tiny_llama, [], [{}])


@pytest.mark.slow
def test_capability_checks_on_the_embedded_model() -> None:
    lm = load_model("default", dtype="float32")
    horses = MCExample("general_knowledge", 0, "How many legs do horses have?", ("two", "four", "six"), (0.0, 1.0, 0.0))
    assert grade([horses], choice_logliks(lm, [horses])).accuracy == 1.0
    result = bigbench(lm, n_per_task=2, tasks=["general_knowledge"])
    assert result.n == 2 and all(len(i["logliks"]) >= 2 for i in result.items)
    replies = ifbench(lm, n=1, max_new_tokens=16)
    assert replies.items[0]["reply"].strip() and replies.n_instructions >= 1
    conversations = [[{"role": "user", "content": "What is the capital of France?"}]]
    (kl,) = next_token_kl(lm, conversations, [{20: Addition(torch.ones(lm.hidden_size), 8.0)}], max_new_tokens=8)
    assert kl.kl > 0 and 0 <= kl.top1_agreement < 1
