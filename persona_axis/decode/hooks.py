"""The one place that touches torch hooks.

Each decoder layer that needs work gets exactly one forward hook, which runs that layer's
operations in order. An operation takes the layer's output hidden states [batch, seq, hidden]
and returns a replacement tensor (an intervention) or None (a recorder that only reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

LayerOp = Callable[[Tensor], Tensor | None]


def _run_ops(ops: tuple[LayerOp, ...], hidden: Tensor) -> Tensor:
    for op in ops:
        replaced = op(hidden)
        if replaced is not None:
            hidden = replaced
    return hidden


def _make_hook(ops: tuple[LayerOp, ...]) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return _run_ops(ops, output)
        if isinstance(output, tuple):  # older blocks return (hidden, attention weights, ...)
            return (_run_ops(ops, output[0]), *output[1:])
        raise TypeError(f"unsupported decoder-layer output type {type(output).__name__}")

    return hook


@contextmanager
def layer_hooks(layers: nn.ModuleList, ops: Mapping[int, Sequence[LayerOp]]) -> Iterator[None]:
    """Attach one hook per layer index in `ops`; always remove them on exit, exceptions included."""
    handles = []
    try:
        for index, layer_ops in ops.items():
            if layer_ops:
                handles.append(layers[index].register_forward_hook(_make_hook(tuple(layer_ops))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def merge_ops(*groups: Mapping[int, Sequence[LayerOp]]) -> dict[int, list[LayerOp]]:
    """Combine several {layer: ops} maps, keeping the order of the groups within each layer."""
    merged: dict[int, list[LayerOp]] = {}
    for group in groups:
        for index, layer_ops in group.items():
            merged.setdefault(index, []).extend(layer_ops)
    return merged
