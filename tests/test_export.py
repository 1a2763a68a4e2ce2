"""`persona-axis export`: the llama.cpp control vector read back with the `gguf` package, the reference `.pt`, one-line
errors, and (where scripts/install-bench-extras.sh has built llama-cpp-python) the vector steering llama.cpp."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from persona_axis.axis import Axis, load_axis, save_axis
from persona_axis.cli import main
from persona_axis.control.export import export_gguf, export_reference_pt, parse_layers
from persona_axis.errors import PersonaAxisError
from persona_axis.store import RunLayout


def tiny_axis(n_layers: int = 6, hidden: int = 8) -> Axis:
    """Rows that differ layer to layer (row L starts with L), so a shifted layer mapping shows."""
    torch.manual_seed(0)
    vectors = torch.randn(n_layers, hidden)
    vectors[:, 0] = torch.arange(n_layers, dtype=torch.float32) + 1
    return Axis(vectors, {"model": "tiny/assistant-model"})


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, gguf.GGUFValueType]]:
    """(metadata values, tensors by name, metadata value types) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    types = {key: field.types[0] for key, field in reader.fields.items() if field.types}
    tensors = {}
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1
        tensors[tensor.name] = np.array(tensor.data)
    return fields, tensors, types


def test_gguf_is_a_llama_cpp_control_vector(tmp_path: Path) -> None:
    axis = tiny_axis()
    export_gguf(axis, tmp_path / "axis.gguf", 2.5, range(1, 6))
    fields, tensors, types = read_gguf(tmp_path / "axis.gguf")
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "tiny/assistant-model"
    assert fields["controlvector.layer_count"] == 5 and types["controlvector.layer_count"] == gguf.GGUFValueType.UINT32
    assert fields["persona_axis.model_layer_count"] == 6
    assert sorted(tensors) == [f"direction.{layer}" for layer in range(1, 6)]
    for layer in range(1, 6):  # our layer L (output of block L, from 0) is llama.cpp's direction.L
        np.testing.assert_allclose(tensors[f"direction.{layer}"], 2.5 * axis.vectors[layer].numpy(), rtol=1e-6)


def test_gguf_holds_only_the_chosen_layers(tmp_path: Path) -> None:
    axis = tiny_axis()
    export_gguf(axis, tmp_path / "axis.gguf", -1.0, parse_layers("2-3", axis.n_layers))
    fields, tensors, _ = read_gguf(tmp_path / "axis.gguf")
    assert sorted(tensors) == ["direction.2", "direction.3"] and fields["controlvector.layer_count"] == 2
    np.testing.assert_allclose(tensors["direction.3"], -axis.vectors[3].numpy())


def test_layer_ranges() -> None:
    assert parse_layers("2-4", 6) == range(2, 5)
    assert parse_layers("5", 6) == range(5, 6)
    for bad, message in [("0-3", "out of range"), ("1-6", "out of range"), ("4-2", "no layer"),
                         ("a-b", "not a layer range"), ("", "not a layer range"), ("1-2-3", "not a layer range")]:
        with pytest.raises(PersonaAxisError, match=message) as error:
            parse_layers(bad, 6)
        assert "\n" not in str(error.value)


def test_gguf_refuses_layer_zero_and_bad_coefficients(tmp_path: Path) -> None:
    axis = tiny_axis()
    with pytest.raises(PersonaAxisError, match="block 0"):
        export_gguf(axis, tmp_path / "axis.gguf", 1.0, [0, 1])
    with pytest.raises(PersonaAxisError, match="once"):
        export_gguf(axis, tmp_path / "axis.gguf", 1.0, [2, 2])
    with pytest.raises(PersonaAxisError, match="finite"):
        export_gguf(axis, tmp_path / "axis.gguf", float("nan"), [1])
    assert not (tmp_path / "axis.gguf").exists()


def test_reference_pt_is_a_plain_tensor(tmp_path: Path) -> None:
    axis = tiny_axis()
    export_reference_pt(axis, tmp_path / "axis.pt")
    loaded = torch.load(tmp_path / "axis.pt", map_location="cpu", weights_only=True)
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.float32
    assert torch.equal(loaded, axis.vectors)
    assert torch.equal(load_axis(tmp_path / "axis.pt").vectors, axis.vectors)


def run_dir(tmp_path: Path) -> tuple[Axis, Path]:
    axis = tiny_axis()
    root = tmp_path / "run"
    root.mkdir()
    save_axis(axis, RunLayout(root).axis)
    return axis, root


def test_cli_exports_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    axis, root = run_dir(tmp_path)
    out = tmp_path / "vectors" / "steer.gguf"
    assert main(["export", str(root), "--format", "gguf", "--out", str(out), "--coefficient", "-0.5",
                 "--layers", "1-4"]) == 0
    assert "direction.1..direction.4" in capsys.readouterr().out
    fields, tensors, _ = read_gguf(out)
    assert fields["controlvector.model_hint"] == "tiny/assistant-model" and sorted(tensors) == [
        f"direction.{layer}" for layer in range(1, 5)]
    np.testing.assert_allclose(tensors["direction.4"], -0.5 * axis.vectors[4].numpy(), rtol=1e-6)

    assert main(["export", str(RunLayout(root).axis), "--format", "gguf", "--out", str(tmp_path / "mid.gguf")]) == 0
    _, tensors, _ = read_gguf(tmp_path / "mid.gguf")  # defaults: the middle layer, coefficient 1
    assert list(tensors) == ["direction.3"]
    np.testing.assert_allclose(tensors["direction.3"], axis.vectors[3].numpy())

    assert main(["export", str(root), "--format", "pt", "--out", str(tmp_path / "axis.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "axis.pt", weights_only=True), axis.vectors)


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--layers", "0-2"], "out of range"),
    (["--format", "gguf", "--layers", "two"], "not a layer range"),
    (["--format", "pt", "--coefficient", "2"], "for --format gguf"),
    (["--format", "gguf", "--out-is-a-directory"], "is a directory"),
    (["--format", "gguf", "--no-such-input"], "not found"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                   message: str) -> None:
    _, root = run_dir(tmp_path)
    source, out = str(root), str(tmp_path / "out.gguf")
    if "--out-is-a-directory" in args:
        args, out = args[:-1], str(tmp_path)
    if "--no-such-input" in args:
        args, source = args[:-1], str(tmp_path / "missing")
    assert main(["export", source, *args, "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not Path(out).is_file()


def test_llama_cpp_steers_with_the_exported_vector(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional: scripts/install-bench-extras.sh builds llama-cpp-python")
    from persona_axis.bench.llamacpp_peer import LlamaCppPeer
    from persona_axis.model.loading import embedded_gguf_path

    set_cvec = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec  # older name
    tokenizer = request.getfixturevalue("tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    peer = LlamaCppPeer(embedded_gguf_path(), sequences=1, length=len(prompt) + 8, threads=1)
    try:
        n_layers, n_embd = llama_cpp.llama_model_n_layer(peer.model), llama_cpp.llama_model_n_embd(peer.model)
        torch.manual_seed(0)
        axis = Axis(torch.nn.functional.normalize(torch.randn(n_layers, n_embd), dim=-1), {"model": "SmolLM2"})
        layer = n_layers // 2

        def reply(coefficient: float | None, start: int = 1) -> list[int]:
            """Greedy reply with no control vector (None) or with the exported one, applied to layers start..n_layers."""
            if coefficient is None:
                set_cvec(peer.ctx, None, 0, n_embd, -1, -1)
            else:
                path = tmp_path / f"steer-{coefficient}.gguf"
                export_gguf(axis, path, coefficient, [layer])
                data = llama_buffer(path, n_embd)
                pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                assert set_cvec(peer.ctx, pointer, data.size, n_embd, start, n_layers) == 0
            return peer.generate([prompt], 8)[0]

        plain = reply(None)
        assert reply(0.0) == plain  # the file itself, at coefficient 0, changes nothing
        assert reply(400.0) != plain  # the axis direction, large, changes the reply
        assert reply(400.0, start=layer + 1) == plain  # direction.L acts at block L only
    finally:
        peer.close()


def llama_buffer(path: Path, n_embd: int) -> np.ndarray:
    """The control vector as llama.cpp's loader lays it out: direction.N at row N - 1 (row 0 is layer 1) [rows * n_embd]."""
    _, tensors, _ = read_gguf(path)
    layers = {int(name.split(".")[1]): values for name, values in tensors.items()}
    data = np.zeros((max(layers), n_embd), dtype=np.float32)
    for layer, values in layers.items():
        data[layer - 1] += values
    return data.reshape(-1)
