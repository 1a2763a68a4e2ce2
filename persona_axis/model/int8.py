"""The fast CPU decode path: weight-only int8 linear layers.

At batch 1 a float32 decode step is bound by reading the weights (4 bytes each) and by the
matrix-vector kernels running at a fraction of the memory bandwidth. Here every linear layer's
weight is quantised to int8 with one scale per output channel. Inputs of up to KERNEL_MAX_ROWS
rows (decode steps of up to that many replies) go through PyTorch's packed CPU kernel
(`torch._weight_int8pack_mm`), which reads a quarter of the bytes; it takes bfloat16 activations,
so the input is rounded to bfloat16 and the output returned in float32. Larger inputs (prompt
processing, big batches), where that kernel is slower than a float32 matrix product, multiply by the
same quantised weights dequantised once to float32, with the kernel's roundings (bfloat16 input and
result), so both routes give the same numbers up to summation order. The residual stream, norms, attention and every
hook (capture, projections, caps, steering) stay float32 and see the decoder layers' outputs exactly
where they were.

It is lossy, so it is opt-in (`--fast-path int8`): tests/test_fast_path.py bounds the loss on the
embedded model, teacher-forced through the int8 kernel at every row: captured response means within
cosine 0.999 of float32; a reply's mean projection on a persona direction within 1 % of the range of
its per-token projections, each per-token projection within 3 % (measured up to 2.7 %).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from persona_axis.errors import PersonaAxisError
from persona_axis.model.linear_layout import TransposedLinear

FAST_PATHS = ("exact", "int8")
# Rows up to which the int8 kernel beats a float32 product on the development CPU (measured: 4-6x at
# 1-4 rows, 1.2x at 16, 0.5-0.75x from 64 rows on).
KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """y = x W^T + b with W [out, in] held as int8 [out, in] and per-row scales [out] (and, for inputs of
    many rows, that quantised weight dequantised to float32 [out, in])."""

    qweight: Tensor
    scales: Tensor
    dequantised: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear | TransposedLinear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().contiguous()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("dequantised", self.qweight.float() * self.scales.float()[:, None])
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] (any float dtype) → [..., out] in x's dtype."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] <= KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:  # the kernel's arithmetic: bfloat16 inputs, float32 sums, a bfloat16 result
            y = (flat.float() @ self.dequantised.T).to(torch.bfloat16)
        y = y.to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def use_int8_linears(model: nn.Module) -> int:
    """Replace every linear layer in `model` (projections, MLPs, output head; either weight layout) by an
    Int8Linear; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.Linear, TransposedLinear):  # exactly these: subclasses may compute otherwise
                setattr(module, name, Int8Linear(cast(nn.Linear, child)))
                replaced += 1
    return replaced


def resolve_fast_path(fast_path: str, device: torch.device) -> str:
    """The path to run on `device`: "auto" is int8 on CPU and exact elsewhere; an impossible one is a one-line error."""
    if fast_path == "auto":
        return "int8" if device.type == "cpu" else "exact"
    if fast_path not in FAST_PATHS:
        raise PersonaAxisError(f"unknown fast path {fast_path!r}: use auto, {' or '.join(FAST_PATHS)}")
    if fast_path == "int8" and device.type != "cpu":
        raise PersonaAxisError(f"the int8 fast path runs on CPU only (device is {device.type}): use --fast-path exact")
    return fast_path
