"""model/context_window.py directly: the model's context length and the sliding window of whole messages."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import tiny_model

from persona_axis.errors import PersonaAxisError
from persona_axis.model.context_window import context_length, fit_window, prompt_window
from persona_axis.model.loading import wrap_model


def _chars(messages: list[dict[str, str]]) -> int:
    """A simple monotone token count: the characters of every message, plus one per message."""
    return sum(len(m["content"]) + 1 for m in messages)


def _conversation(n: int, system: bool) -> list[dict[str, str]]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * (3 + 2 * i)}
             for i in range(n)]
    return ([{"role": "system", "content": "Be brief."}] if system else []) + turns


def _smallest_drop_by_brute_force(messages: list[dict[str, str]], budget: int) -> int | None:
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    for dropped in range(len(rest)):
        if _chars(head + rest[dropped:]) <= budget:
            return dropped
    return None


def test_a_conversation_that_fits_is_returned_whole() -> None:
    messages = _conversation(4, system=True)
    kept, dropped = fit_window(messages, _chars(messages), _chars)
    assert kept == messages and dropped == 0


@pytest.mark.parametrize("system", [True, False])
def test_the_window_drops_the_fewest_oldest_messages_and_keeps_the_system_message(system: bool) -> None:
    messages = _conversation(9, system)
    for budget in range(1, _chars(messages) + 2):
        expected = _smallest_drop_by_brute_force(messages, budget)
        if expected is None:
            with pytest.raises(PersonaAxisError, match=f"longer than the {budget}-token window"):
                fit_window(messages, budget, _chars)
            continue
        kept, dropped = fit_window(messages, budget, _chars)
        assert dropped == expected, budget
        assert _chars(kept) <= budget
        head = messages[:1] if system else []
        assert kept == head + messages[len(head) + dropped:]  # whole messages, oldest first, order kept
        assert kept[-1] == messages[-1]


def test_a_last_message_too_long_alone_is_refused() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "y" * 50}]
    with pytest.raises(PersonaAxisError, match="the last message alone is longer than the 20-token window"):
        fit_window(messages, 20, _chars)
    with pytest.raises(PersonaAxisError, match="last message alone"):
        fit_window([{"role": "user", "content": "y" * 50}], 20, _chars)


def test_bisection_asks_for_few_counts() -> None:
    messages = _conversation(64, system=True)
    calls = itertools.count()

    def counting(m: list[dict[str, str]]) -> int:
        next(calls)
        return _chars(m)

    kept, dropped = fit_window(messages, _chars(messages) // 3, counting)
    assert dropped == _smallest_drop_by_brute_force(messages, _chars(messages) // 3)
    assert next(calls) <= 2 + 7 + 1  # whole, the last alone, then log2(63) bisection steps (the model renders each)


def test_context_length_reads_the_text_config(tokenizer: Any) -> None:
    for family in ("llama", "gpt2", "gemma3_multimodal"):
        assert context_length(wrap_model(tiny_model(family), tokenizer)) == 512, family


@pytest.mark.parametrize("text_config", [SimpleNamespace(), SimpleNamespace(max_position_embeddings=None)])
def test_context_length_falls_back_to_the_tokenizer(text_config: Any) -> None:
    lm = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text_config)),
                         tokenizer=SimpleNamespace(model_max_length=777))
    assert context_length(lm) == 777  # type: ignore[arg-type]


def test_prompt_window_counts_rendered_prompt_tokens(tokenizer: Any) -> None:
    lm = wrap_model(tiny_model("llama"), tokenizer)
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "words " * 20} for i in range(11)]
    full = lm.prompt_length(messages)
    budget = full - 40
    kept, dropped = prompt_window(lm, messages, budget)
    assert dropped > 0 and kept[0] == messages[0] and kept[1:] == messages[1 + dropped:]
    assert lm.prompt_length(kept) <= budget
    assert lm.prompt_length(messages[:1] + messages[dropped:]) > budget  # one message fewer dropped would not fit
