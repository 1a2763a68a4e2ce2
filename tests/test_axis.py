from __future__ import annotations

from pathlib import Path

import pytest
import torch

from persona_axis.axis import Axis, compute_axis, cosine_per_layer, export_axis_torch, load_axis, save_axis
from persona_axis.errors import PersonaAxisError


@pytest.fixture()
def axis() -> Axis:
    torch.manual_seed(0)
    return Axis(torch.randn(4, 8), {"model": "m", "model_hash": "h"})


def test_compute_axis_is_default_minus_mean_of_roles() -> None:
    default = torch.ones(2, 3)
    roles = torch.stack([torch.zeros(2, 3), 2 * torch.ones(2, 3), -torch.ones(2, 3)])
    torch.testing.assert_close(compute_axis(default, roles), torch.full((2, 3), 2 / 3))
    with pytest.raises(PersonaAxisError, match="every role was dropped"):
        compute_axis(default, torch.zeros(0, 2, 3))


def test_projection_sign_convention(axis: Axis) -> None:
    assistant_like = axis.vectors[1] * 3
    assert axis.project(assistant_like, 1) > 0 > axis.project(-assistant_like, 1)
    torch.testing.assert_close(cosine_per_layer(axis.vectors, 2 * axis.vectors), torch.ones(4))


def test_own_format_round_trip(tmp_path: Path, axis: Axis) -> None:
    save_axis(axis, tmp_path / "axis.safetensors")
    loaded = load_axis(tmp_path)  # a run directory works too
    assert torch.equal(loaded.vectors, axis.vectors)
    assert loaded.metadata["model"] == "m" and "Assistant-like" in loaded.metadata["sign_convention"]


def test_torch_formats(tmp_path: Path, axis: Axis) -> None:
    export_axis_torch(axis, tmp_path / "a.pt")
    assert torch.equal(load_axis(tmp_path / "a.pt").vectors, axis.vectors)
    torch.save(axis.vectors.clone(), tmp_path / "bare.pt")
    assert torch.equal(load_axis(tmp_path / "bare.pt").vectors, axis.vectors)


class Payload:
    """Stands for arbitrary code in a pickle: loading it would need to import and build this class."""


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    torch.save({"axis": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PersonaAxisError, match="cannot read"):
        load_axis(tmp_path / "evil.pt")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [(torch.zeros(3), r"must be \[layers, hidden\]"), (torch.full((2, 3), float("inf")), "NaN or inf"),
     (torch.zeros(2, 3), "all-zero layer")],
)
def test_bad_axis_files(tmp_path: Path, tensor: torch.Tensor, message: str) -> None:
    torch.save({"axis": tensor}, tmp_path / "x.pt")
    with pytest.raises(PersonaAxisError, match=message):
        load_axis(tmp_path / "x.pt")


def test_missing_file_and_model_mismatch(tmp_path: Path, axis: Axis) -> None:
    with pytest.raises(PersonaAxisError, match="axis file not found"):
        load_axis(tmp_path / "none.safetensors")
    with pytest.raises(PersonaAxisError, match=r"does not fit .*\[30 layers, 576 hidden\]"):
        axis.check_model(30, 576)
