"""Unit vectors and cosines: exact values on small vectors, and a zero vector refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from persona_axis.axis import Axis, cosine_per_layer
from persona_axis.errors import PersonaAxisError
from persona_axis.vectors import cosine, unit_vector


def test_unit_vector_normalises_each_row_and_keeps_the_dtype() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.float64)
    units = unit_vector(rows)
    assert units.dtype == torch.float64
    assert units.tolist() == [[0.6, 0.8], [0.0, -1.0]]
    assert unit_vector(torch.tensor([0.0, 5.0])).tolist() == [0.0, 1.0]


def test_a_zero_vector_has_no_direction() -> None:
    with pytest.raises(PersonaAxisError, match="watched direction is all zeros"):
        unit_vector(torch.zeros(4), "watched direction")
    with pytest.raises(PersonaAxisError, match="all zeros"):
        unit_vector(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # one zero row is enough
    with pytest.raises(PersonaAxisError, match="cosine of trait 'calm' and the axis is undefined"):
        cosine(torch.zeros(3), torch.ones(3), "trait 'calm' and the axis")
    with pytest.raises(PersonaAxisError, match="undefined"):
        cosine(torch.ones(3), torch.zeros(3))


def test_cosine_values() -> None:
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert cosine(a, torch.tensor([1.0, 1.0], dtype=torch.float64)) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert cosine(a, torch.tensor([0.0, 3.0], dtype=torch.float64)) == 0.0
    assert cosine(a, -5 * a) == -1.0
    assert cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])) == pytest.approx(24 / 25)


def test_the_axis_refuses_a_zero_layer() -> None:
    axis = Axis(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert axis.unit(0).tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(PersonaAxisError, match="the axis at layer 1 is all zeros"):
        axis.unit(1)
    with pytest.raises(PersonaAxisError, match="all zeros"):
        axis.units()
    torch.testing.assert_close(Axis(torch.tensor([[3.0, 4.0], [0.0, 2.0]])).units(), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    with pytest.raises(PersonaAxisError, match="layer-1 rows is undefined"):
        cosine_per_layer(axis.vectors, torch.ones(2, 2))
