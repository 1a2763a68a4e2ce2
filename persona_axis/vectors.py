"""Directions in activation space: unit vectors and cosines, with a zero vector refused.

A zero vector has no direction, so normalising it or taking its cosine is a PersonaAxisError
that names the vector, never a silent NaN or 0.
"""

from __future__ import annotations

from torch import Tensor

from persona_axis.errors import PersonaAxisError


def unit_vector(vector: Tensor, what: str = "direction vector") -> Tensor:
    """vector [..., hidden] divided by its norm along the last dimension (every row a unit vector), same dtype.

    A row that is all zeros is a PersonaAxisError naming `what`.
    """
    norms = vector.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise PersonaAxisError(f"{what} is all zeros: it has no direction to project, steer or cap along")
    return vector / norms


def cosine(a: Tensor, b: Tensor, what: str = "vectors") -> float:
    """Cosine between two [hidden] vectors (in their own dtype); a zero vector is a PersonaAxisError naming `what`."""
    denominator = a.norm() * b.norm()
    if denominator == 0:
        raise PersonaAxisError(f"cosine of {what} is undefined: one of them is all zeros")
    return float(a @ b / denominator)
