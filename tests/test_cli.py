from __future__ import annotations

import subprocess
import sys

import pytest

from persona_axis.cli import main


def test_bad_model_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("persona-axis: error: unknown model 'no-such-model'")


def test_console_script_exits_nonzero_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "persona_axis.cli", "demo", "--model", "/nowhere/x.gguf"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "persona-axis: error: GGUF file not found: /nowhere/x.gguf"


@pytest.mark.slow
def test_demo_prints_three_replies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("default Assistant", "pirate captain", "ancient dragon"):
        assert f"=== {name} ===" in out
    assert out.count("per-layer activation norm (layers 0..29):") == 3
