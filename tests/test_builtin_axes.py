"""Built-in axes: a run packaged into the package's form, `--axis NAME` for its model only, the shipped smollm2 axis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from persona_axis import builtin_axes
from persona_axis.axis import load_axis
from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.builtin_axes import BuiltinAxis, builtin_axis_dir, package_run
from persona_axis.catalog import load_catalog
from persona_axis.cli import main
from persona_axis.control.calibration import run_projections
from persona_axis.control.capping import load_config
from persona_axis.control.spec import run_defaults
from persona_axis.errors import PersonaAxisError
from persona_axis.evals.conditions import pc1_axis
from persona_axis.evals.guard import halfway_threshold
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import load_model
from persona_axis.store import RunLayout, load_tensors


class AlternatingJudge:
    """Scores 3 and 1 alternately, so every role keeps answers (mechanics only)."""

    id = "alternating"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if k % 2 == 0 else 1, "alternating", self.id) for k in range(len(items))]


@pytest.fixture(scope="module")
def packaged(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny finished run with two capping configs, its built-in form under <axes>/tiny)."""
    root = tmp_path_factory.mktemp("builtin")
    run = root / "run"
    run_pipeline(run, load_model(tiny_model_dir, dtype="float32"), load_catalog(),
                 preset_settings("smoke", max_new_tokens=6), AlternatingJudge(), progress=False)
    assert main(["calibrate", str(run), "--layers", "1:3", "--no-engagement"]) == 0
    assert main(["calibrate", str(run), "--layers", "1:3", "--floor", "default-mean", "--out",
                 str(run / "capping-mean"), "--no-engagement"]) == 0
    package_run(run, root / "axes" / "tiny", [run / "capping", run / "capping-mean.json"], tiny_model_dir,
                {"command": "calibrated smoke run of a tiny random model"})
    return run, root / "axes" / "tiny"


def test_package_run_keeps_the_axis_default_vector_and_caps_only(packaged: tuple[Path, Path],
                                                                  tiny_model_dir: str) -> None:
    run, dest = packaged
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == [
        "axis.safetensors", "capping.json", "capping.safetensors", "manifest.json", "vectors.safetensors"]
    assert torch.equal(load_axis(dest).vectors, load_axis(run).vectors)
    vectors, _ = load_tensors(RunLayout(dest).vectors)
    assert list(vectors) == ["default"] and torch.equal(run_defaults(dest), run_defaults(run))
    floors = {e: [c.floor for c in x.caps] for stem in ("capping", "capping-mean")
              for e, x in load_config(run / stem).experiments.items()}
    assert sorted(floors) == ["layers_1:3-mean", "layers_1:3-p0.25"]
    assert {e: [c.floor for c in x.caps] for e, x in load_config(dest / "capping").experiments.items()} == floors
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["builtin"] == {"command": "calibrated smoke run of a tiny random model"}
    assert manifest["model_spec"] == tiny_model_dir
    assert manifest["identity"] == json.loads((run / "manifest.json").read_text())["identity"]
    with pytest.raises(PersonaAxisError, match="holds no role vectors"):
        pc1_axis(dest, load_axis(dest))


def test_axis_name_loads_for_its_model_and_is_refused_for_another(
        packaged: tuple[Path, Path], tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(builtin_axes, "AXES_DIR", packaged[1].parent)
    monkeypatch.setattr(builtin_axes, "BUILTIN_AXES", {"tiny": BuiltinAxis("tiny", (tiny_model_dir,))})
    monkeypatch.chdir(tmp_path)  # no file named "tiny" here
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps([{"role": "user", "content": "Who are you?"}]) + "\n")
    args = ["generate", str(prompts), "--dtype", "float32", "--max-new-tokens", "3", "--json", "--axis", "tiny"]
    assert main([*args, "--cap", "layers_1:3-mean"]) == 0  # the axis's own model (no --model), the merged config's cap
    [row] = json.loads(capsys.readouterr().out)["conversations"]
    assert set(row["capped"]["cap_engaged"]) == {"1", "2"}
    assert main([*args, "--model", tiny_model_dir, "--steer=-0.5n@2", "--layer", "0"]) == 0  # reads the default vector
    [row] = json.loads(capsys.readouterr().out)["conversations"]
    assert row["steered"]["projections"][2] is None
    assert main([*args, "--model", "qwen2.5-coder-0.5b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "computed for --model" in err and "qwen2.5-coder-0.5b" in err
    with pytest.raises(PersonaAxisError, match="no built-in axis 'smollm2'"):
        builtin_axis_dir("smollm2")
    (tmp_path / "tiny").mkdir()  # a path of the same name wins over the built-in name
    assert main([*args, "--model", tiny_model_dir]) == 2
    assert "axis file not found: tiny" in capsys.readouterr().err
    out = tmp_path / "axis.gguf"
    assert main(["export", str(packaged[1]), "--format", "gguf", "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_the_shipped_smollm2_axis_drives_the_embedded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    directory = builtin_axis_dir("smollm2")
    assert sum(p.stat().st_size for p in directory.iterdir()) < 1_000_000  # a few hundred KB, not a run
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["preset"] == "standard" and {"command", "dtype", "cpu", "date"} <= set(manifest["builtin"])
    experiment = next(iter(load_config(directory / "capping").experiments))
    monkeypatch.chdir(tmp_path)
    talk = tmp_path / "talk.json"
    talk.write_text(json.dumps([{"role": "user", "content": "Are you conscious?"},
                                {"role": "assistant", "content": "I am an AI assistant, so no."}]))
    assert main(["monitor", str(talk), "--axis", "smollm2", "--json"]) == 0
    [conversation] = json.loads(capsys.readouterr().out)["conversations"]
    assert [t["role"] for t in conversation["turns"]] == ["user", "assistant"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps([{"role": "user", "content": "Who are you?"}]) + "\n")
    assert main(["generate", str(prompts), "--axis", "smollm2", "--cap", experiment, "--max-new-tokens", "4",
                 "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["conversations"]
    assert row["capped"]["cap_engaged"]


def test_a_builtin_axis_has_the_guard_threshold_of_its_run(packaged: tuple[Path, Path]) -> None:
    run, dest = packaged
    axis = load_axis(run)
    expected = float(run_projections(run, axis, [1], "default").mean()) - 0.5 * float(axis.vectors[1].norm())
    assert halfway_threshold(dest, load_axis(dest), 1) == pytest.approx(expected, abs=1e-4)  # no activations there


def test_stability_of_a_builtin_axis_asks_for_its_run(packaged: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stability", str(packaged[1]), "--split-half"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give the run directory itself" in err


def test_the_shipped_qwen_axis_is_for_qwen_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = builtin_axis_dir("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b")
    assert sum(p.stat().st_size for p in directory.iterdir()) < 1_000_000
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["preset"] == "standard" and manifest["model_spec"] == "qwen2.5-coder-0.5b"
    assert {"command", "dtype", "cpu", "date", "wall_time"} <= set(manifest["builtin"])
    assert tuple(load_axis(directory).vectors.shape) == (24, 896)
    assert tuple(run_defaults(directory).shape) == (24, 896)
    experiments = load_config(directory / "capping").experiments
    assert {e.rpartition("-")[2] for e in experiments} >= {"p0.25", "mean"}
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps([{"role": "user", "content": "Who are you?"}]) + "\n")
    assert main(["generate", str(prompts), "--axis", "qwen2.5-coder-0.5b", "--model", "default", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "computed for --model qwen2.5-coder-0.5b, not 'default'" in err
