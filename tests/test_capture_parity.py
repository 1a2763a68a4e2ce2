"""Captured response means against plain transformers, for every tiny family, at every layer.

The reference here uses no project hook and no project forward: each conversation is rendered
with the tokenizer's own chat template, prompt + reply is run once through the unmodified model
with `output_hidden_states=True`, and the reply positions are averaged.

What transformers' `hidden_states` holds (transformers 5.x records it with its own hooks on the
decoder-layer classes; checked below for each family, not assumed):
- entry 0 is the input of the first decoder block (the embeddings; GPT-2 adds its position
  embeddings, Gemma scales by sqrt(hidden));
- entry k + 1 is decoder block k's output, the residual stream after the block, which is the
  project's definition of layer k's activation;
- by default the LAST entry is replaced by the final norm's output (`last_hidden_state`), so it is
  not the last block's output: true of all ten families here (for gemma3_multimodal the switch
  below lives on the text config). transformers' documented config switch
  `tie_last_hidden_states=False` keeps the pre-norm value there instead. The reference sets it, and
  the test proves the switch did what it says: the final norm applied to the untied last entry
  gives the tied last entry (and the two differ), so the untied entry is what feeds the final
  norm, i.e. the last block's output.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from conftest import FAMILIES, tiny_model

from persona_axis.decode.generate import generate
from persona_axis.model.loading import LoadedModel, wrap_model

CHATS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are a lighthouse keeper."}, {"role": "user", "content": "What do you see tonight?"}],
    [{"role": "user", "content": "Name three rivers and say which one is longest, with a reason."}],
    [{"role": "user", "content": "Why?"}],
]
MAX_NEW = 10


def _text_configs(model: torch.nn.Module) -> list[Any]:
    """The configs whose `tie_last_hidden_states` governs the decoder's hidden states (outer and text config)."""
    outer, text = model.config, model.config.get_text_config()
    return [outer] if outer is text else [outer, text]


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    decoder = model.base_model
    decoder = getattr(decoder, "language_model", decoder)
    for name in ("norm", "ln_f", "final_layer_norm"):
        if isinstance(getattr(decoder, name, None), torch.nn.Module):
            return getattr(decoder, name)
    raise AssertionError(f"no final norm found on {type(decoder).__name__}")


@torch.no_grad()
def _plain_hidden_states(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Every decoder block's output [seq, hidden] for one unpadded sequence, from transformers alone."""
    tensor = torch.tensor([ids])
    configs = _text_configs(model)
    saved = [getattr(c, "tie_last_hidden_states", None) for c in configs]
    try:
        tied = model(input_ids=tensor, output_hidden_states=True).hidden_states
        for c in configs:
            c.tie_last_hidden_states = False
        untied = model(input_ids=tensor, output_hidden_states=True).hidden_states
    finally:
        for c, value in zip(configs, saved):
            c.tie_last_hidden_states = value
    n_blocks = len(untied) - 1
    # Everything but the last entry is the same either way; the last one differs by the final norm.
    for k in range(n_blocks):
        assert torch.equal(tied[k], untied[k])
    assert not torch.allclose(tied[-1], untied[-1])
    torch.testing.assert_close(_final_norm(model)(untied[-1]), tied[-1], atol=1e-6, rtol=1e-6)
    return tuple(h[0] for h in untied[1:])  # block k's output is entry k + 1


def _template_ids(tokenizer: Any, chat: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _with_extra_stop(lm: LoadedModel) -> LoadedModel:
    """Make the token this random model emits most an end-of-turn token, so some replies end before MAX_NEW."""
    trial = generate(lm, CHATS, max_new_tokens=MAX_NEW, capture=False)
    frequent = Counter(t for ids in trial.token_ids for t in ids[1:]).most_common(1)[0][0]
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, frequent]
    return lm


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_means_equal_plain_transformers_at_every_layer(family: str, continuous: bool, tokenizer: Any) -> None:
    lm = _with_extra_stop(wrap_model(tiny_model(family), tokenizer))
    result = generate(lm, CHATS, max_new_tokens=MAX_NEW, batch_size=3, capture=True, continuous=continuous)
    assert result.layers == list(range(lm.n_layers)) == [0, 1, 2]
    assert result.means is not None and result.means.dtype == torch.float32
    assert result.means.shape == (len(CHATS), lm.n_layers, lm.hidden_size)
    lengths = [len(ids) for ids in result.token_ids]
    assert sum(lengths) > 0 and (any(result.finished) or not continuous)
    for i, chat in enumerate(CHATS):
        prompt, reply = _template_ids(tokenizer, chat), result.token_ids[i]
        assert prompt == lm.prompt_ids(chat)  # the project feeds exactly the template's tokens
        if not reply:  # an immediate end-of-turn: nothing to average, and the capture says so
            assert torch.count_nonzero(result.means[i]) == 0
            continue
        blocks = _plain_hidden_states(lm.model, prompt + reply)
        assert len(blocks) == lm.n_layers
        for layer, states in enumerate(blocks):
            expected = states[len(prompt):].float().mean(0)
            torch.testing.assert_close(result.means[i, layer], expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, i=i, layer=layer: f"{family} reply {i} layer {layer}: {m}")


@torch.no_grad()
def _plain_bf16_step_states(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> list[torch.Tensor]:
    """Per layer, the bf16 block outputs [len(reply), hidden] of the reply tokens, fed one at a time with a cache.

    This is transformers' own incremental forward (its DynamicCache, no project code), the way a
    decode loop computes a reply token's activations.
    """
    configs = _text_configs(model)
    saved = [getattr(c, "tie_last_hidden_states", None) for c in configs]
    for c in configs:
        c.tie_last_hidden_states = False
    try:
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, rows = out.past_key_values, []
        for token in reply:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            rows.append(torch.stack([h[0, -1] for h in out.hidden_states[1:]]))
    finally:
        for c, value in zip(configs, saved):
            c.tie_last_hidden_states = value
    steps = torch.stack(rows)  # [tokens, layers, hidden] bf16
    assert steps.dtype == torch.bfloat16
    return [steps[:, layer] for layer in range(steps.shape[1])]


def test_bf16_model_means_are_accumulated_in_float32(tokenizer: Any) -> None:
    """Under a bfloat16 model the per-token activations are bf16, but their sums and means are float32."""
    lm = wrap_model(tiny_model("llama").to(torch.bfloat16), tokenizer)
    chat = [{"role": "user", "content": "Describe a long walk along a windy beach in autumn, step by step."}]
    result = generate(lm, [chat], max_new_tokens=48, batch_size=1, capture=True, stop_at_eos=False)
    reply = result.token_ids[0]
    assert len(reply) == 48 and result.means is not None and result.means.dtype == torch.float32
    per_layer = _plain_bf16_step_states(lm.model, _template_ids(tokenizer, chat), reply)
    for layer, states in enumerate(per_layer):
        exact = states.float().mean(0)  # float32 accumulation of the bf16 activations
        torch.testing.assert_close(result.means[0, layer], exact, atol=1e-5, rtol=1e-5)
        # A bf16 running sum would fail that same tolerance, so the check above has teeth.
        bf16_sum = torch.zeros_like(states[0])
        for row in states:
            bf16_sum = bf16_sum + row
        assert not torch.allclose(bf16_sum.float() / len(reply), exact, atol=1e-5, rtol=1e-5)
    # And the one-pass forward over prompt + reply agrees too, within bf16 rounding of the activations
    # (the blocks before the last: the last entry of the default hidden_states is after the final norm).
    with torch.no_grad():
        full = lm.model(input_ids=torch.tensor([_template_ids(tokenizer, chat) + reply]), output_hidden_states=True)
    for layer in range(lm.n_layers - 1):
        expected = full.hidden_states[layer + 1][0, -len(reply):].float().mean(0)
        torch.testing.assert_close(result.means[0, layer], expected, atol=2e-2, rtol=2e-2)
