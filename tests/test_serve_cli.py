"""`persona-axis serve` as a user starts it (a subprocess on an ephemeral 127.0.0.1 port), and our own command-line
clients pointed at it: `steer-sweep --judge openai --judge-url` and `simulate --user-url`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import EXPERIMENT, tiny_axis_and_config

from persona_axis.axis import save_axis
from persona_axis.cli import main
from persona_axis.control.capping import save_config
from persona_axis.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served_cli(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(API base URL, axis file) of a `persona-axis serve` subprocess; stopped at the end."""
    work = tmp_path_factory.mktemp("serve-cli")
    axis, config = tiny_axis_and_config(load_model(tiny_model_dir, dtype="float32"))
    save_axis(axis, work / "axis.safetensors")
    save_config(config, work / "capping")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "persona_axis.cli", "serve", "--model", tiny_model_dir, "--dtype", "float32",
         "--axis", str(work / "axis.safetensors"), "--config", str(work / "capping"), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "serving" in line, line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        yield url, work / "axis.safetensors"
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()


def test_the_command_serves_the_api_and_the_page(served_cli: tuple[str, Path]) -> None:
    url, _ = served_cli
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    root = url.removesuffix("/v1")
    assert "<svg id=\"token-chart\"" in httpx.get(root + "/").text
    assert [e["id"] for e in httpx.get(url + "/persona_axis").json()["experiments"]] == [EXPERIMENT]
    reply = httpx.post(url + "/chat/completions", timeout=60, json={
        "model": "persona-axis", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "persona_axis": {"cap": EXPERIMENT}}).json()
    assert reply["usage"]["completion_tokens"] == len(reply["persona_axis"]["projections"])


def test_our_judge_and_user_simulator_commands_use_it(served_cli: tuple[str, Path], tiny_model_dir: str,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, axis = served_cli
    model = ["--model", tiny_model_dir, "--dtype", "float32", "--axis", str(axis)]
    assert main(["steer-sweep", *model, "--judge", "openai", "--judge-url", url, "--judge-model", "persona-axis",
                 "--coefs", "0", "--roles", "1", "--questions", "1", "--max-new-tokens", "4", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert sweep["judge"] == "openai:persona-axis"
    assert main(["simulate", *model, "--user-url", url, "--user-model-name", "persona-axis", "--domain", "coding",
                 "--turns", "1", "--n", "1", "--max-new-tokens", "4", "--json", "--out", str(tmp_path / "sim")]) == 0
    assert json.loads(capsys.readouterr().out)
    assert any((tmp_path / "sim").iterdir())


def test_help_names_defaults_only_where_there_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --help` shows each set default ("default: 8000") but never "(default: None)" after an option whose
    help already says what happens without it (--model, --config)."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 8000" in text and "(default: None)" not in text
