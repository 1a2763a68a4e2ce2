"""Executors without a cluster: the local executor is the default; asking for Ray without the extra is one clear line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from persona_axis.build.ray_executor import ModelSpec, RayExecutor
from persona_axis.cli import main
from persona_axis.errors import PersonaAxisError


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(PersonaAxisError, match=r'pip install -e "\.\[ray\]"'):
        RayExecutor(ModelSpec())
    assert main(["run", "--out", str(tmp_path / "run"), "--preset", "smoke", "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "persona-axis: error: the Ray executor needs the ray extra" in err
