"""layer_hooks: one hook per layer, its operations in order, always removed, tuple outputs handled."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from persona_axis.decode.hooks import layer_hooks, merge_ops


class Block(nn.Module):
    """A decoder-like block: adds `shift`; returns a tensor, or (hidden, extra) like older blocks."""

    def __init__(self, shift: float, as_tuple: bool = False) -> None:
        super().__init__()
        self.shift, self.as_tuple = shift, as_tuple

    def forward(self, hidden: Tensor) -> Tensor | tuple[Tensor, str]:
        out = hidden + self.shift
        return (out, "attention weights") if self.as_tuple else out


def run(layers: nn.ModuleList, hidden: Tensor) -> Tensor:
    for layer in layers:
        out = layer(hidden)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@pytest.fixture()
def layers() -> nn.ModuleList:
    return nn.ModuleList([Block(1.0), Block(10.0), Block(100.0)])


def test_one_hook_per_layer_and_none_for_empty_op_lists(layers: nn.ModuleList) -> None:
    ops = {0: [lambda h: None, lambda h: None, lambda h: h * 2], 2: []}
    with layer_hooks(layers, ops):
        assert [len(layer._forward_hooks) for layer in layers] == [1, 0, 0]
        assert run(layers, torch.zeros(1, 2, 4)).tolist() == [[[112.0] * 4] * 2]  # (0 + 1) * 2 + 10 + 100


def test_ops_run_in_order_each_seeing_the_previous_replacement(layers: nn.ModuleList) -> None:
    seen: list[float] = []
    ops = {1: [lambda h: h * 3, lambda h: seen.append(float(h[0, 0, 0])), lambda h: h - 1]}
    with layer_hooks(layers, ops):
        out = run(layers, torch.zeros(1, 1, 2))
    assert seen == [33.0]  # (0 + 1 + 10) * 3, before the subtraction
    assert out.tolist() == [[[132.0, 132.0]]]  # 33 - 1 + 100


def test_hooks_are_removed_on_exit_and_on_exception(layers: nn.ModuleList) -> None:
    with layer_hooks(layers, {0: [lambda h: h * 0]}):
        pass
    assert all(not layer._forward_hooks for layer in layers)
    with pytest.raises(KeyError), layer_hooks(layers, {0: [lambda h: h * 0], 2: [lambda h: h * 0]}):
        raise KeyError("boom")
    assert all(not layer._forward_hooks for layer in layers)
    assert run(layers, torch.zeros(1, 1, 1)).item() == 111.0


def test_tuple_outputs_have_their_hidden_states_replaced_and_the_rest_kept() -> None:
    block = Block(1.0, as_tuple=True)
    with layer_hooks(nn.ModuleList([block]), {0: [lambda h: h * 5]}):
        hidden, extra = block(torch.ones(1, 1, 2))
    assert hidden.tolist() == [[[10.0, 10.0]]] and extra == "attention weights"


def test_unsupported_output_type_is_a_type_error() -> None:
    class Strange(nn.Module):
        def forward(self, hidden: Tensor) -> dict[str, Tensor]:
            return {"hidden": hidden}

    strange = Strange()
    with layer_hooks(nn.ModuleList([strange]), {0: [lambda h: h]}), pytest.raises(TypeError, match="dict"):
        strange(torch.ones(1))


def test_merge_ops_keeps_group_order_within_a_layer() -> None:
    def a(h: Tensor) -> None: ...
    def b(h: Tensor) -> None: ...
    def c(h: Tensor) -> None: ...

    assert merge_ops({1: [a], 2: [b]}, {1: [c, b]}) == {1: [a, c, b], 2: [b]}
