from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import generate, stop_token_ids
from persona_axis.decode.interventions import Addition
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, wrap_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You are a hermit."}, {"role": "user", "content": "Tell me about your cave, please."}],
    [{"role": "user", "content": "What is the capital of a country you like, and why do you like it so much?"}],
    [{"role": "system", "content": "You are a dragon."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "Count to ten."}],
]


def _with_frequent_stop_token(lm: LoadedModel) -> LoadedModel:
    """Make a token the random model emits often an end-of-turn token, so some replies finish early."""
    first = generate(lm, CONVERSATIONS, max_new_tokens=12, capture=False)
    common = Counter(t for ids in first.token_ids for t in ids[2:]).most_common(1)[0][0]
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, common]
    return lm


def _prompt_ids(lm: LoadedModel) -> list[list[int]]:
    return [lm.tokenizer(lm.chat_prompt(c), add_special_tokens=False).input_ids for c in CONVERSATIONS]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_one_pass_capture_equals_separate_forward(family: str, tokenizer: Any) -> None:
    lm = _with_frequent_stop_token(wrap_model(tiny_model(family), tokenizer))
    result = generate(lm, CONVERSATIONS, max_new_tokens=12, batch_size=3)
    assert any(result.finished) and not all(result.finished)  # both kinds of ending are exercised
    for ids, done in zip(result.token_ids, result.finished):
        assert not set(ids) & set(stop_token_ids(lm))  # stop tokens never count as response
        assert done or len(ids) == 12
    reference = response_means_by_forward(lm, _prompt_ids(lm), result.token_ids, range(lm.n_layers), batch_size=2)
    assert result.means is not None and result.means.shape == (5, 3, 64)
    for i, ids in enumerate(result.token_ids):
        if ids:
            torch.testing.assert_close(result.means[i], reference[i], atol=1e-4, rtol=1e-4)


def test_capture_matches_hidden_states_from_transformers(tiny_llama: LoadedModel) -> None:
    """Independent check of which positions count: HF's own hidden_states over prompt + response."""
    result = generate(tiny_llama, CONVERSATIONS[:2], max_new_tokens=6, capture=[0, 1])
    for i, conversation in enumerate(CONVERSATIONS[:2]):
        prompt = tiny_llama.tokenizer(tiny_llama.chat_prompt(conversation), add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + result.token_ids[i]])
        with torch.no_grad():
            states = tiny_llama.model(input_ids=ids, output_hidden_states=True).hidden_states
        for slot, layer in enumerate([0, 1]):  # hidden_states[layer + 1] is layer's output (before the final norm)
            expected = states[layer + 1][0, len(prompt):].mean(0)
            torch.testing.assert_close(result.means[i, slot], expected, atol=1e-4, rtol=1e-4)


def test_results_in_input_order_whatever_the_batching(tiny_llama: LoadedModel) -> None:
    one = generate(tiny_llama, CONVERSATIONS, max_new_tokens=5, batch_size=1, capture=False)
    many = generate(tiny_llama, CONVERSATIONS, max_new_tokens=5, batch_size=4, capture=False)
    assert one.token_ids == many.token_ids


def test_sampling_is_seeded(tiny_llama: LoadedModel) -> None:
    a = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, capture=False)
    b = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, capture=False)
    c = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=4, capture=False)
    assert a.token_ids == b.token_ids != c.token_ids


def test_interventions_apply_during_generation_and_are_removed(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(0)
    push = Addition(torch.randn(64), coef=30.0)
    plain = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, capture=[2])
    steered = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, capture=[2], interventions={1: push})
    assert plain.token_ids != steered.token_ids
    assert sum(len(layer._forward_hooks) for layer in tiny_llama.layers) == 0
    again = generate(tiny_llama, CONVERSATIONS, max_new_tokens=6, capture=[2])
    assert again.token_ids == plain.token_ids


def test_generation_errors(tiny_llama: LoadedModel) -> None:
    with pytest.raises(PersonaAxisError, match="max_new_tokens"):
        generate(tiny_llama, CONVERSATIONS, max_new_tokens=0)
    with pytest.raises(PersonaAxisError, match="out of range"):
        generate(tiny_llama, CONVERSATIONS, capture=[5])


def test_watch_records_per_token_projections_matching_the_forward(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(5)
    direction = torch.randn(64)
    streamed: dict[int, list[float]] = {}

    def on_token(row: int, _token: int, projection: float) -> None:
        streamed.setdefault(row, []).append(projection)

    result = generate(tiny_llama, CONVERSATIONS[:3], max_new_tokens=7, batch_size=2, capture=False,
                      watch=(1, direction), on_token=on_token)
    assert result.projections is not None
    unit = direction / direction.norm()
    for i, conversation in enumerate(CONVERSATIONS[:3]):
        prompt = tiny_llama.tokenizer(tiny_llama.chat_prompt(conversation), add_special_tokens=False).input_ids
        with torch.no_grad():
            states = tiny_llama.model(input_ids=torch.tensor([prompt + result.token_ids[i]]),
                                      output_hidden_states=True).hidden_states
        expected = (states[2][0, len(prompt):] @ unit).tolist()
        assert len(result.projections[i]) == len(result.token_ids[i])
        torch.testing.assert_close(torch.tensor(result.projections[i]), torch.tensor(expected), atol=1e-4, rtol=1e-4)
        assert streamed[i] == result.projections[i]  # the stream carried the same values, live


def test_stop_at_eos_false_generates_exactly_max_new_tokens(tiny_llama: LoadedModel) -> None:
    lm = _with_frequent_stop_token(tiny_llama)
    stopped = generate(lm, CONVERSATIONS, max_new_tokens=10, capture=False)
    fixed = generate(lm, CONVERSATIONS, max_new_tokens=10, capture=False, stop_at_eos=False)
    assert any(stopped.finished) and all(len(ids) == 10 for ids in fixed.token_ids) and not any(fixed.finished)
