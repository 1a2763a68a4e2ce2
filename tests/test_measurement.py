"""The measured-layer rule: projections are never read at a layer an intervention changes."""

from __future__ import annotations

import pytest
import torch

from persona_axis.axis import Axis
from persona_axis.errors import PersonaAxisError
from persona_axis.measurement import check_layer_index, layer_after_block, measured_layer

AXIS = Axis(torch.ones(30, 4))  # 30 layers: the middle layer is 15


def test_default_is_the_middle_layer_when_it_is_upstream_of_every_intervention() -> None:
    assert measured_layer(AXIS, []) == 15
    assert measured_layer(AXIS, range(21, 26)) == 15
    assert measured_layer(AXIS, [16, 29]) == 15


def test_default_moves_just_below_interventions_that_reach_the_middle() -> None:
    assert measured_layer(AXIS, [15]) == 14
    assert measured_layer(AXIS, range(10, 20)) == 9
    assert measured_layer(AXIS, [3, 20]) == 2  # below the lowest, not merely outside the blocks


def test_block_starting_at_layer_zero_is_measured_above_it() -> None:
    assert measured_layer(AXIS, range(0, 18)) == 18
    assert measured_layer(AXIS, [0, 5]) == 6
    with pytest.raises(PersonaAxisError, match="no layer of 30 to measure at"):
        measured_layer(AXIS, range(30))


def test_requested_layer_is_range_checked_and_never_intervened() -> None:
    assert measured_layer(AXIS, range(21, 26), requested=27) == 27  # outside the block is allowed
    assert measured_layer(AXIS, [], requested=0) == 0
    with pytest.raises(PersonaAxisError, match=r"--layer 23 is intervened on \(layers \[21, 22, 23, 24, 25\]\)"):
        measured_layer(AXIS, range(21, 26), requested=23)
    for bad in (-1, 30, 99):
        with pytest.raises(PersonaAxisError, match=rf"--layer {bad} is out of range.*0\.\.29"):
            measured_layer(AXIS, [], requested=bad)
    with pytest.raises(PersonaAxisError, match="steered layer -2 is out of range"):
        check_layer_index(-2, 30, "steered layer")


def test_layer_after_block() -> None:
    assert layer_after_block(range(21, 26), 30) == 26
    assert layer_after_block(range(25, 30), 30) == 24  # ends at the last layer: read just before it
    with pytest.raises(PersonaAxisError, match="covers all 30 layers"):
        layer_after_block(range(0, 30), 30)
