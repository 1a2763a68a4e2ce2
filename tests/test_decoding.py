"""decode/common.py directly: left padding, the end-of-turn ids, the preallocated cache against the stock one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from conftest import tiny_model

from persona_axis.decode.common import DecodeSpec, Reply, counting_rows, left_padded, preallocated_cache, stop_token_ids
from persona_axis.model.loading import wrap_model


def test_left_padded_pads_on_the_left_and_counts_positions_from_the_first_real_token() -> None:
    ids, attention, positions = left_padded([[5, 6, 7], [8], [9, 10]], pad=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]  # padding sits at position 0, never negative
    assert ids.dtype == attention.dtype == positions.dtype == torch.long


def test_left_padded_with_equal_lengths_adds_no_padding() -> None:
    ids, attention, positions = left_padded([[1, 2], [3, 4]], pad=99, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2], [3, 4]] and attention.tolist() == [[1, 1], [1, 1]]
    assert positions.tolist() == [[0, 1], [0, 1]]


def _lm_with_eos(configured: Any, tokenizer_eos: int | None) -> Any:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    return SimpleNamespace(model=model, tokenizer=SimpleNamespace(eos_token_id=tokenizer_eos))


@pytest.mark.parametrize("configured, tokenizer_eos, expected", [
    (7, 2, [2, 7]),
    ([9, 7, 9], 2, [2, 7, 9]),  # a list, deduplicated and sorted
    ([], 2, [2]),
    (None, 2, [2]),
    (2, 2, [2]),
    ([3], None, [3]),
    (None, None, []),
])
def test_stop_token_ids_unite_the_generation_config_and_the_tokenizer(configured: Any, tokenizer_eos: int | None,
                                                                      expected: list[int]) -> None:
    assert stop_token_ids(_lm_with_eos(configured, tokenizer_eos)) == expected  # type: ignore[arg-type]


def test_stop_token_ids_of_a_model_without_generation_config() -> None:
    lm = SimpleNamespace(model=SimpleNamespace(), tokenizer=SimpleNamespace(eos_token_id=4))
    assert stop_token_ids(lm) == [4]  # type: ignore[arg-type]


def test_stop_token_ids_of_the_tiny_model(tokenizer: Any) -> None:
    lm = wrap_model(tiny_model("llama"), tokenizer)
    lm.model.generation_config.eos_token_id = [tokenizer.eos_token_id, 17]
    assert stop_token_ids(lm) == sorted({tokenizer.eos_token_id, 17})


@torch.no_grad()
def _decode(model: torch.nn.Module, cache: Any, prompts: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], Any]:
    """Prefill a batch, then feed the greedy token `steps` times; the logits of every call."""
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return logits, cache


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_preallocated_cache_equals_the_stock_cache(family: str) -> None:
    model = tiny_model(family)
    prompts = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    steps = 6
    cache = preallocated_cache(model, prompts.shape[1] + steps)
    assert all(type(layer).__name__ == "PreallocatedLayer" for layer in cache.layers)
    mine, mine_cache = _decode(model, cache, prompts, steps)
    stock, stock_cache = _decode(model, transformers.DynamicCache(config=model.config), prompts, steps)
    for a, b in zip(mine, stock):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for layer, reference in zip(mine_cache.layers, stock_cache.layers):
        assert layer.keys.shape[-2] == prompts.shape[1] + steps
        torch.testing.assert_close(layer.keys, reference.keys, atol=0, rtol=0)
        torch.testing.assert_close(layer.values, reference.values, atol=0, rtol=0)
        assert layer._key_buffer.shape[-2] == prompts.shape[1] + steps  # written in place, never reallocated
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()


def test_preallocated_cache_keeps_the_stock_layers_for_sliding_window_models() -> None:
    model = tiny_model("gemma2")  # alternates sliding-window and full attention layers
    cache = preallocated_cache(model, 32)
    stock = transformers.DynamicCache(config=model.config)
    assert [type(layer) for layer in cache.layers] == [type(layer) for layer in stock.layers]
    assert not any(type(layer).__name__ == "PreallocatedLayer" for layer in cache.layers)


class _Counter:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def count_rows(self, rows: Any) -> None:
        self.calls.append(rows)


def test_counting_rows_sets_then_clears_the_rows_even_on_error() -> None:
    caps = [_Counter(), _Counter()]
    rows = torch.tensor([True, False])
    with counting_rows(caps, rows):  # type: ignore[arg-type]
        assert all(c.calls == [rows] for c in caps)
    assert all(c.calls == [rows, None] for c in caps)
    with pytest.raises(RuntimeError), counting_rows(caps, rows):  # type: ignore[arg-type]
        raise RuntimeError("a failed step")
    assert all(c.calls == [rows, None, rows, None] for c in caps)


def _spec(layers: list[int], watch: Any = None) -> DecodeSpec:
    return DecodeSpec(max_new_tokens=4, temperature=0.0, top_p=1.0, layers=layers, interventions={}, watch=watch,
                      on_token=None, stops=frozenset())


def test_spec_records_only_when_activations_are_read() -> None:
    assert not _spec([]).records
    assert _spec([0]).records
    assert _spec([], watch=(1, torch.ones(4))).records


def test_reply_without_capture_says_so() -> None:
    reply = Reply(text="hi", token_ids=[1], finished=True, means=None, projections=None)
    with pytest.raises(ValueError, match="without capture"):
        reply.captured_means()
    means = torch.zeros(3, 4)
    assert Reply("hi", [1], True, means, None).captured_means() is means
