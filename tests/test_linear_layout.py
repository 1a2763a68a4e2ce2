"""The CPU weight layout: the widening linear layers of a loaded model hold W^T, give what nn.Linear gives, and a
model in the stock layout generates the same replies."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import tiny_model
from torch import nn

from persona_axis.decode.generate import generate
from persona_axis.model.int8 import Int8Linear, use_int8_linears
from persona_axis.model.linear_layout import TransposedLinear, use_cpu_layout, use_stock_layout
from persona_axis.model.loading import wrap_model

CHATS = [[{"role": "user", "content": "Name three rivers."}],
         [{"role": "system", "content": "You are a hermit."}, {"role": "user", "content": "Who are you?"}]]


def test_a_transposed_linear_computes_what_the_linear_does() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 40)
    layer = TransposedLinear(linear)
    assert layer.weight_t.shape == (16, 40) and layer.weight_t.is_contiguous()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.weight, linear.weight)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_wrapped_cpu_model_widens_in_the_new_layout_and_replies_as_the_stock_one(tokenizer: Any, family: str) -> None:
    lm = wrap_model(tiny_model(family), tokenizer, name=f"tiny-{family}")
    kinds = [(type(m), m.in_features <= m.out_features) for m in lm.model.modules()
             if isinstance(m, (nn.Linear, TransposedLinear))]
    assert kinds and all((kind is TransposedLinear) == widening for kind, widening in kinds)
    stock = wrap_model(tiny_model(family), tokenizer, name=f"tiny-{family}")
    assert use_stock_layout(stock.model) == sum(widening for _, widening in kinds)
    assert not any(isinstance(m, TransposedLinear) for m in stock.model.modules())
    ours, theirs = (generate(m, CHATS, max_new_tokens=8, batch_size=2) for m in (lm, stock))
    assert ours.token_ids == theirs.token_ids
    torch.testing.assert_close(ours.captured_means(), theirs.captured_means(), atol=1e-5, rtol=1e-5)


def test_int8_takes_either_layout_and_other_devices_are_left_alone(tokenizer: Any) -> None:
    lm = wrap_model(tiny_model("llama"), tokenizer, name="tiny")
    layers = sum(isinstance(m, (nn.Linear, TransposedLinear)) for m in lm.model.modules())
    model = copy.deepcopy(lm.model)
    assert use_int8_linears(model) == layers and sum(isinstance(m, Int8Linear) for m in model.modules()) == layers
    with torch.inference_mode():  # the int8 kernel needs its weights contiguous, whichever layout they came from
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    meta = tiny_model("llama").to("meta")
    assert use_cpu_layout(meta) == 0
