"""Where a reported projection is read: never at a layer an intervention has already changed.

Capture hooks run after the intervention hooks of the same layer, so a projection read at an
intervened layer measures the intervention itself (a steered layer moves by exactly coef × ‖axis‖,
a capped layer sits at its floor). Every report therefore reads its projection at a layer no
intervention touches, and names that layer. Layers are 0-indexed decoder-layer outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from persona_axis.errors import PersonaAxisError

if TYPE_CHECKING:  # annotations only: model/loading.py imports this module for check_layer_index
    from persona_axis.axis import Axis


def check_layer_index(layer: int, n_layers: int, what: str = "--layer") -> int:
    """`layer` if 0 <= layer < n_layers, else a PersonaAxisError (negative values are not counted from the end)."""
    if not 0 <= layer < n_layers:
        raise PersonaAxisError(f"{what} {layer} is out of range: the model has {n_layers} layers, "
                               f"choose one of 0..{n_layers - 1}")
    return layer


def measured_layer(axis: Axis, intervened: Iterable[int], requested: int | None = None) -> int:
    """The layer at which to read projections when `intervened` layers are changed during generation.

    A requested layer is range-checked and refused when intervened. Otherwise: the middle layer
    (`Axis.layer_or_middle`) when it lies below every intervened layer (or nothing is intervened);
    else the layer just below the lowest intervened layer; when that is layer 0, the first layer
    above the highest intervened layer. A model with no layer left to measure at is an error.
    """
    touched = sorted(set(intervened))
    if requested is not None:
        check_layer_index(requested, axis.n_layers)
        if requested in touched:
            raise PersonaAxisError(f"--layer {requested} is intervened on (layers {touched}): a projection there "
                                   "measures the intervention itself; choose a layer outside them")
        return requested
    middle = axis.layer_or_middle(None)
    if not touched or middle < touched[0]:
        return middle
    if touched[0] > 0:
        return touched[0] - 1
    if touched[-1] + 1 < axis.n_layers:
        return touched[-1] + 1
    raise PersonaAxisError(f"interventions at layers {touched} leave no layer of {axis.n_layers} to measure at: "
                           "intervene on fewer layers")


def layer_after_block(block: range, n_layers: int) -> int:
    """Where a capping sweep reads a block's effect: block.stop (the first layer after it) when the model
    has one, else block.start − 1 (just before it); a block covering every layer is an error."""
    if block.stop < n_layers:
        return block.stop
    if block.start > 0:
        return block.start - 1
    raise PersonaAxisError(f"block {block.start}:{block.stop} covers all {n_layers} layers: "
                           "no layer is left to measure its effect at; choose a smaller block")
