"""Shared prompt prefixes prefilled once: the grouping, the cache, and replies equal to whole-prompt prefills."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.decode.engine import Engine, run_to_end
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Ablation, Addition, Cap, steer
from persona_axis.decode.kv import supports_slots
from persona_axis.decode.prefix_cache import MIN_SHARED, PrefixCache, common_length, plan_prefill, prefill, shared_prefill
from persona_axis.decode.requests import Sampling
from persona_axis.decode.row_interventions import RowSettings
from persona_axis.model.loading import LoadedModel, load_model, wrap_model

SYSTEMS = ["You are a lighthouse keeper on a remote northern island, weathered and patient, who speaks slowly. "
           "You have kept the light for forty winters, you know every ship that passes by the sound of its engine, "
           "and you answer every question as the keeper would, with the sea always somewhere in your words.",
           "You are a dragon who has guarded the same mountain hoard for a thousand years and trusts nobody. You "
           "count your gold every night, you remember every thief who ever tried, and you answer as the dragon "
           "would: proud, suspicious, a little amused by the small creatures who come to talk to you."]
QUESTIONS = ["What do you do all day?", "What is your favourite food?", "Who are you?", "Describe the weather."]
CONVERSATIONS = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s in SYSTEMS for q in QUESTIONS]


def test_prompts_are_grouped_by_their_shared_beginning() -> None:
    a, b = list(range(80)), list(range(100, 180))
    prompts = [a + [1, 2], a + [3, 4, 5], b + [6, 7], list(range(200, 210)), a + [8, 9]]
    cache = PrefixCache()
    groups = plan_prefill(prompts, cache)
    assert [(g.members, g.shared, g.cached) for g in groups] == [([0, 1, 4], 80, None), ([2, 3], 0, None)]
    assert common_length(a + [1], a + [2]) == 80 and common_length([], a) == 0
    cache.add(a + [1, 2], [(torch.zeros(1, 2, 82, 4), torch.zeros(1, 2, 82, 4))])
    [hit, rest] = plan_prefill([a + [7, 7, 7], b + [1, 1]], cache)
    assert hit.members == [0] and hit.shared == 80 and hit.cached is not None and hit.cached[0][0].shape[2] == 80
    assert rest.members == [1] and rest.shared == 0 and cache.hits == 1
    whole = a[:MIN_SHARED + 2]  # a prompt that is all prefix still keeps two tokens to prefill itself
    [again] = [g for g in plan_prefill([whole], cache) if g.cached is not None]
    assert again.shared == len(whole) - 2


# The families whose cache is plain full attention (the continuous loop's); mistral and the Gemmas use sliding
# windows and decode in the static loop, which prefills whole prompts.
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox"])
def test_a_shared_prefill_equals_whole_prompt_prefills(tokenizer: Any, family: str) -> None:
    lm = wrap_model(tiny_model(family), tokenizer, name=f"tiny-{family}")
    assert supports_slots(lm.model)
    prompts = [lm.prompt_ids(c) for c in CONVERSATIONS]
    pad = int(tokenizer.pad_token_id)
    with torch.inference_mode():
        whole_logits, whole = prefill(lm.model, prompts, pad, lm.device)
        cache = PrefixCache()
        logits, shared = shared_prefill(lm.model, prompts, pad, lm.device, cache)
        assert len(cache.entries) == 2  # one prefix per system prompt
        torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)
        for mine, theirs, prompt in zip(shared, whole, prompts):
            for (k, v), (k0, v0) in zip(mine, theirs):
                assert k.shape[1] == len(prompt)
                torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)


def test_generate_with_shared_prefixes_gives_the_same_replies(tiny_llama: LoadedModel) -> None:
    """Greedy, with interventions and capture on, in batches of 3 slots (later admissions reuse cached prefixes)."""
    torch.manual_seed(0)
    direction = torch.randn(tiny_llama.hidden_size)
    for interventions in ({}, {1: [Cap(direction, 0.5, track=True)], 2: [Addition(direction, -1.0)]}):
        kwargs: dict[str, Any] = {"max_new_tokens": 8, "batch_size": 3, "interventions": interventions}
        shared = generate(tiny_llama, CONVERSATIONS, **kwargs)
        whole = generate(tiny_llama, CONVERSATIONS, share_prefixes=False, **kwargs)
        assert shared.token_ids == whole.token_ids
        torch.testing.assert_close(shared.captured_means(), whole.captured_means(), atol=1e-5, rtol=1e-5)
    engine = Engine(tiny_llama, max_rows=3, prefill_chunk=10_000, keep_conversations=False)
    run_to_end(engine, [(tiny_llama.prompt_ids(c), Sampling(4), RowSettings()) for c in CONVERSATIONS])
    prefixes = engine.runner.prefixes
    assert prefixes is not None and prefixes.hits > 0  # admissions after the first found their prefix


def test_last_position_interventions_act_at_each_prompts_end_not_the_shared_prefixs(tiny_llama: LoadedModel) -> None:
    """Given through `interventions` or by an outer `steer` block: the shared prefix's own pass is no prompt's end."""
    torch.manual_seed(1)
    direction = torch.randn(tiny_llama.hidden_size)
    last = {1: [Ablation(direction, 5.0, positions="last")]}
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "batch_size": 8}
    whole = generate(tiny_llama, CONVERSATIONS, interventions=last, share_prefixes=False, **kwargs)
    shared = generate(tiny_llama, CONVERSATIONS, interventions=last, **kwargs)
    with steer(tiny_llama, last):
        outer = generate(tiny_llama, CONVERSATIONS, **kwargs)
    plain = generate(tiny_llama, CONVERSATIONS, share_prefixes=False, **kwargs)
    assert shared.token_ids == whole.token_ids == outer.token_ids and whole.token_ids != plain.token_ids
    torch.testing.assert_close(shared.captured_means(), whole.captured_means(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outer.captured_means(), whole.captured_means(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_embedded_model_gives_the_same_rollouts_with_shared_prefixes() -> None:
    embedded = load_model("default", dtype="float32", progress=False)
    shared = generate(embedded, CONVERSATIONS, max_new_tokens=16, batch_size=4)
    whole = generate(embedded, CONVERSATIONS, max_new_tokens=16, batch_size=4, share_prefixes=False)
    assert shared.token_ids == whole.token_ids
    torch.testing.assert_close(shared.captured_means(), whole.captured_means(), atol=1e-4, rtol=1e-5)
