"""The Assistant Axis: computation, projection, and files.

Sign convention (used everywhere in persona-axis): the axis points from the role-played characters
toward the default Assistant, axis = mean(default activations) − mean(role vectors), per layer.
A higher projection means more Assistant-like; capping is a floor on that projection.

Our file format: safetensors with one tensor "axis" [layers, hidden] float32 and string metadata
(model, model hash, layers, sign convention, run manifest hash). Also read: torch files holding
{"axis": tensor[layers, hidden]} or a bare tensor, opened with weights_only=True (never unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from persona_axis.errors import PersonaAxisError
from persona_axis.store import RunLayout, load_tensors
from persona_axis.vectors import cosine, unit_vector

SIGN_CONVENTION = "default_minus_roles: higher projection = more Assistant-like"


@dataclass
class Axis:
    """vectors [layers, hidden] float32 (not normalised), plus provenance metadata."""

    vectors: Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def layer_or_middle(self, layer: int | None) -> int:
        """`layer`, or the middle layer (n_layers // 2) when None: the default layer of every report."""
        return self.n_layers // 2 if layer is None else layer

    def unit(self, layer: int) -> Tensor:
        """Unit axis direction at a layer [hidden]; an all-zero layer is a PersonaAxisError."""
        return unit_vector(self.vectors[layer], f"the axis at layer {layer}")

    def units(self) -> Tensor:
        """Unit axis directions at every layer [layers, hidden]; an all-zero layer is a PersonaAxisError."""
        return unit_vector(self.vectors, "a layer of the axis")

    def project(self, activations: Tensor, layer: int) -> Tensor:
        """Projection of activations [..., hidden] on the unit axis at `layer` -> [...] (float32)."""
        return activations.float() @ self.unit(layer)

    def check_model(self, n_layers: int, hidden_size: int, name: str = "the model") -> None:
        if (self.n_layers, self.hidden_size) != (n_layers, hidden_size):
            raise PersonaAxisError(
                f"axis shape [{self.n_layers}, {self.hidden_size}] does not fit {name} "
                f"([{n_layers} layers, {hidden_size} hidden]): compute an axis for this model"
            )


def compute_axis(default_mean: Tensor, role_vectors: Tensor) -> Tensor:
    """axis = default_mean [layers, hidden] − mean over roles of role_vectors [roles, layers, hidden]."""
    if role_vectors.shape[0] == 0:
        raise PersonaAxisError("no role vectors to compute an axis from: every role was dropped")
    return default_mean.float() - role_vectors.float().mean(0)


def cosine_per_layer(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per layer between two [layers, hidden] tensors -> [layers] float32 (a zero row is an error)."""
    pairs = enumerate(zip(a.float(), b.float()))
    return torch.tensor([cosine(x, y, f"the two layer-{layer} rows") for layer, (x, y) in pairs])


def save_axis(axis: Axis, path: str | Path) -> None:
    """Write our format (safetensors + metadata)."""
    from safetensors.torch import save_file

    metadata = {**axis.metadata, "sign_convention": SIGN_CONVENTION, "layers": str(axis.n_layers)}
    save_file({"axis": axis.vectors.float().contiguous()}, str(path), metadata=metadata)


def load_axis(path: str | Path) -> Axis:
    """Load an axis from our safetensors format, or a run directory holding axis.safetensors, or a torch file.

    Torch files may hold {"axis": tensor[layers, hidden]} or a bare tensor; they are opened with
    weights_only=True, so no code in them runs.
    """
    path = Path(path)
    if path.is_dir():
        path = RunLayout(path).axis
    if not path.exists():
        raise PersonaAxisError(f"axis file not found: {path} (give a run directory or an axis file)")
    if path.suffix == ".safetensors":
        tensors, metadata = load_tensors(path)
        if "axis" not in tensors:
            raise PersonaAxisError(f"{path} holds no 'axis' tensor")
        return _checked(Axis(tensors["axis"].float(), metadata), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, unsupported globals, truncated files
        raise PersonaAxisError(f"cannot read {path} as a torch tensor file: {str(exc).splitlines()[0]}") from None
    tensor = obj.get("axis") if isinstance(obj, dict) else obj
    if not isinstance(tensor, Tensor):
        raise PersonaAxisError(f"{path} holds no axis: expected a tensor or a dict with key 'axis'")
    return _checked(Axis(tensor.float(), {"source": str(path)}), path)


def _checked(axis: Axis, path: Path) -> Axis:
    if axis.vectors.dim() != 2:
        raise PersonaAxisError(f"{path}: axis must be [layers, hidden], got shape {tuple(axis.vectors.shape)}")
    if not torch.isfinite(axis.vectors).all():
        raise PersonaAxisError(f"{path}: axis contains NaN or inf values")
    if (axis.vectors.norm(dim=-1) == 0).any():
        raise PersonaAxisError(f"{path}: axis has an all-zero layer")
    return axis


def export_axis_torch(axis: Axis, path: str | Path) -> None:
    """Write {"axis": tensor[layers, hidden]} as a torch file (for tools that read that structure)."""
    torch.save({"axis": axis.vectors.float().clone()}, path)


def axis_metadata(model: str, model_hash: str, manifest_hash: str, extra: dict[str, object] | None = None) -> dict[str, str]:
    """Metadata strings stored with an axis."""
    meta = {"model": model, "model_hash": model_hash, "run_manifest_hash": manifest_hash}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True)
    return meta
