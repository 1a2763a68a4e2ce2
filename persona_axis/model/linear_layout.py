"""The CPU weight layout of linear layers: [in, out] where that reads the weights faster.

A decode step at small batch is bound by reading every weight once. nn.Linear keeps W [out, in] and
computes x W^T; on the development CPU (AMD EPYC, 2 threads, float32, weights streamed from memory
rather than cache) the product x @ W_t with W_t = W^T held contiguous [in, out] read the weights at
18-22 GB/s against 13-16 GB/s for the layers that widen or keep the width (in <= out: the attention
projections, the MLP's gate and up projections, the output head), and was slower for the narrowing
down projection. `use_cpu_layout` gives every linear layer with in <= out that layout, once, at load
time: on the embedded model a batch-1 decode step ran 1.2-1.5x faster and a batch-16 one 1.1x, with
the same greedy replies (activations within 1e-4 of the stock layout: the sums run in another order).
`bench generate` times both layouts in one run (`batch1_vs_previous_exact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class TransposedLinear(nn.Module):
    """y = x @ W_t + b, with W_t [in, out] contiguous (the weight of an nn.Linear, transposed once)."""

    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        # parameters, not buffers: accelerate offloads and dispatches them like nn.Linear's
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> Tensor:
        """W [out, in], as nn.Linear holds it (a view)."""
        return self.weight_t.t()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def _replace(model: nn.Module, keep: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every child of type `keep` with in_features <= out_features by make(child); returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is keep and child.in_features <= child.out_features:  # type: ignore[operator]
                setattr(module, name, make(child))
                replaced += 1
    return replaced


def _stock(layer: TransposedLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight_t.device, dtype=layer.weight_t.dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear.requires_grad_(False)


def use_cpu_layout(model: nn.Module) -> int:
    """Give every nn.Linear of a CPU model with in <= out the [in, out] layout, in place; returns how many.
    Models on other devices, sharded by a device map or with weights not in memory are left as they are."""
    params = list(model.parameters())
    if getattr(model, "hf_device_map", None) or any(p.device.type != "cpu" for p in params):
        return 0
    return _replace(model, nn.Linear, TransposedLinear)  # type: ignore[arg-type]


def use_stock_layout(model: nn.Module) -> int:
    """Undo `use_cpu_layout` in place (benchmarks time the stock layout beside it); returns how many."""
    return _replace(model, TransposedLinear, _stock)  # type: ignore[arg-type]
