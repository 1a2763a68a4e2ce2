"""Export an axis to files other runtimes load: a llama.cpp control vector (GGUF) and the reference `.pt` layout.

llama.cpp control vector: a GGUF file with general.architecture = "controlvector", string
`controlvector.model_hint`, uint32 `controlvector.layer_count` (the number of direction tensors, as
llama.cpp's own cvector-generator counts them) and one float32 tensor [hidden] per steered layer.

Layer names: our layer L is the output of decoder block L, counted from 0 (where our hooks act).
llama.cpp adds tensor `direction.N` to the output of its block N, also counted from 0 (its loader
puts direction.N at row N - 1 of a buffer that starts at layer 1, and block il reads row il - 1),
so our layer L is written as `direction.L`. Block 0's output is out of llama.cpp's reach: the
loader rejects `direction.0`, so layer 0 cannot be exported.

llama.cpp only adds the vector at every position; it has no way to cap a projection.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from persona_axis.axis import SIGN_CONVENTION, Axis
from persona_axis.errors import PersonaAxisError
from persona_axis.store import atomic_write_bytes

ARCHITECTURE = "controlvector"


def direction_name(layer: int) -> str:
    """The control-vector tensor that llama.cpp adds to the output of block `layer` (our layer index)."""
    return f"direction.{layer}"


def parse_layers(text: str, n_layers: int) -> range:
    """Layers "A-B" (inclusive) or "A" of an axis with `n_layers` layers, as llama.cpp can steer them (1..n_layers-1)."""
    first, dash, last = text.partition("-")
    try:
        layers = range(int(first), int(last if dash else first) + 1)
    except ValueError:
        raise PersonaAxisError(f"--layers {text!r} is not a layer range: write A-B (inclusive, e.g. 8-12) "
                               "or one layer A") from None
    _check_layers(layers, n_layers, text)
    return layers


def _check_layers(layers: Sequence[int], n_layers: int, shown: str) -> None:
    if len(layers) == 0:
        raise PersonaAxisError(f"layers {shown} select no layer: give A-B with A <= B")
    if len(set(layers)) != len(layers):
        raise PersonaAxisError(f"layers {shown} repeat a layer: give each layer once")
    if min(layers) < 1 or max(layers) >= n_layers:
        raise PersonaAxisError(
            f"layers {shown} are out of range: llama.cpp can steer layers 1..{n_layers - 1} of this "
            f"{n_layers}-layer axis (it never adds a vector to block 0's output)")


def export_gguf(axis: Axis, path: str | Path, coefficient: float, layers: Sequence[int]) -> None:
    """Write `coefficient` × axis.vectors[L] [hidden] float32 as tensor `direction.L` for each L in `layers`.

    A positive coefficient pushes replies toward the Assistant end of the axis, a negative one away from it.
    """
    if not math.isfinite(coefficient):
        raise PersonaAxisError(f"coefficient {coefficient} is not a finite number")
    _check_layers(layers, axis.n_layers, ",".join(map(str, layers)) or "(none)")
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "vector.gguf"
        writer = gguf.GGUFWriter(str(scratch), ARCHITECTURE)  # writes general.architecture
        writer.add_string(f"{ARCHITECTURE}.model_hint", axis.metadata.get("model", "unknown"))
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(layers))
        writer.add_uint32("persona_axis.model_layer_count", axis.n_layers)
        writer.add_float32("persona_axis.coefficient", coefficient)
        writer.add_string("persona_axis.sign_convention", SIGN_CONVENTION)
        for layer in sorted(layers):
            writer.add_tensor(direction_name(layer), (axis.vectors[layer].float() * coefficient).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _write(path, scratch.read_bytes())


def export_reference_pt(axis: Axis, path: str | Path) -> None:
    """Write the axis in the reference's published layout: torch.save of a plain tensor [layers, hidden] float32."""
    buffer = io.BytesIO()
    torch.save(axis.vectors.float().contiguous().clone(), buffer)
    _write(path, buffer.getvalue())


def _write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all; a path that cannot be written is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise PersonaAxisError(f"output {path} is a directory: give a file path (e.g. {path / 'axis.gguf'})")
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise PersonaAxisError(f"cannot write {path}: {exc.strerror or exc}") from None
