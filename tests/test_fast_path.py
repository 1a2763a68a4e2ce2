"""The int8 fast path: what it replaces, that hooks still act through it, and how much it changes
the numbers the toolkit reads (captured means, per-token projections) on the embedded model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model
from torch import Tensor, nn

from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import generate
from persona_axis.decode.hooks import layer_hooks
from persona_axis.decode.interventions import Cap
from persona_axis.errors import PersonaAxisError
from persona_axis.model import int8 as fast_path
from persona_axis.model.int8 import Int8Linear, resolve_fast_path
from persona_axis.model.loading import LoadedModel, load_model, wrap_model


@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 20, 64)])  # 15 rows: the int8 kernel; 40: dequantised weights
def test_int8_linear_is_close_to_the_float_linear_but_quantised(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    fast = Int8Linear(linear)
    x = torch.randn(*shape)
    exact, approx = linear(x), fast(x)
    assert approx.shape == exact.shape == (*shape[:-1], 48) and approx.dtype == torch.float32
    assert fast.qweight.dtype == torch.int8
    relative = ((approx - exact).norm() / exact.norm()).item()
    assert 0 < relative < 0.02


def test_both_int8_routes_use_the_same_quantised_weights() -> None:
    torch.manual_seed(0)
    fast = Int8Linear(nn.Linear(64, 48))
    rows = torch.randn(40, 64)
    many = fast(rows)  # dequantised weights
    few = torch.cat([fast(rows[i : i + 8]) for i in range(0, 40, 8)])  # the int8 kernel
    assert ((many - few).norm() / many.norm()).item() < 1e-3  # summation order, seen through bfloat16 rounding


def test_use_int8_linears_replaces_every_linear_and_keeps_hooks_acting(tokenizer: Any) -> None:
    model = tiny_model("llama")
    linears = sum(type(m) is nn.Linear for m in model.modules())
    lm = wrap_model(model, tokenizer, fast_path="int8")
    assert lm.fast_path == "int8" and lm.numerics() == {"dtype": "float32", "fast_path": "int8"}
    assert sum(isinstance(m, Int8Linear) for m in lm.model.modules()) == linears > 0
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    conversation = [[{"role": "user", "content": "Hello there"}]]
    direction = torch.randn(lm.hidden_size)
    cap = Cap(direction, floor=1e6, track=True)  # a floor nothing reaches: every token is raised
    capped = generate(lm, conversation, max_new_tokens=6, capture=[1], interventions={1: cap})
    plain = generate(lm, conversation, max_new_tokens=6, capture=[1])
    assert cap.engaged() == 1.0
    assert capped.means is not None and plain.means is not None
    assert not torch.allclose(capped.means, plain.means)


def test_fast_path_choice_is_checked() -> None:
    assert resolve_fast_path("auto", torch.device("cpu")) == "int8"
    assert resolve_fast_path("auto", torch.device("cuda")) == "exact"
    with pytest.raises(PersonaAxisError, match="CPU only"):
        resolve_fast_path("int8", torch.device("cuda"))
    with pytest.raises(PersonaAxisError, match="unknown fast path"):
        resolve_fast_path("int4", torch.device("cpu"))


def _token_states(lm: LoadedModel, ids: list[int], layer: int) -> Tensor:
    """The residual stream after `layer` at every position of `ids`: [len(ids), hidden]."""
    seen: list[Tensor] = []

    def keep(hidden: Tensor) -> Tensor:
        seen.append(hidden[0].detach().float())
        return hidden

    with torch.inference_mode(), layer_hooks(lm.layers, {layer: [keep]}):
        lm.model(input_ids=torch.tensor([ids]))
    return seen[0]


CONVERSATIONS = [
    [{"role": "user", "content": "How do I keep basil alive on a windowsill?"}],
    [{"role": "system", "content": "You are a pirate captain who speaks only in sea shanties."},
     {"role": "user", "content": "Who are you, really?"}],
    [{"role": "system", "content": "You are a quiet hermit living in the mountains."},
     {"role": "user", "content": "What did you do today?"}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
]


@pytest.fixture(scope="module")
def embedded_pair() -> tuple[LoadedModel, LoadedModel]:
    return (load_model("default", dtype="float32", fast_path="exact", progress=False),
            load_model("default", dtype="float32", fast_path="int8", progress=False))


def test_int8_path_keeps_captured_means_and_projections_on_the_embedded_model(
        embedded_pair: tuple[LoadedModel, LoadedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher-forced on the exact path's greedy replies: every layer's response mean within cosine
    0.999; on a persona direction, each reply's mean projection within 1 % of the reply's range of
    per-token projections, and every per-token projection within 3 % of it (measured: up to 2.7 %,
    so the per-token readout is not within the 1 % the reference path would need)."""
    exact, fast = embedded_pair
    monkeypatch.setattr(fast_path, "KERNEL_MAX_ROWS", 1 << 30)  # every row through the int8 kernel: the lossier route
    replies = generate(exact, CONVERSATIONS, max_new_tokens=32, capture=False)
    prompts = [exact.tokenizer(exact.chat_prompt(c), add_special_tokens=False).input_ids for c in CONVERSATIONS]
    layers = list(range(exact.n_layers))
    means_exact = response_means_by_forward(exact, prompts, replies.token_ids, layers)
    means_fast = response_means_by_forward(fast, prompts, replies.token_ids, layers)
    cosines = torch.nn.functional.cosine_similarity(means_exact, means_fast, dim=-1)  # [replies, layers]
    assert cosines.min().item() >= 0.999, cosines.min(dim=0).values

    layer = exact.n_layers // 2
    role_play = means_exact[1:3, layer].mean(0)
    direction = means_exact[[0, 3], layer].mean(0) - role_play
    unit = direction / direction.norm()
    for prompt, reply in zip(prompts, replies.token_ids):
        ids = prompt + reply
        p_exact = _token_states(exact, ids, layer)[len(prompt):] @ unit
        p_fast = _token_states(fast, ids, layer)[len(prompt):] @ unit
        spread = (p_exact.max() - p_exact.min()).item()
        assert abs(p_fast.mean() - p_exact.mean()).item() <= 0.01 * spread
        assert (p_fast - p_exact).abs().max().item() <= 0.03 * spread
