"""`persona-axis serve` as a user starts it (a subprocess on an ephemeral 127.0.0.1 port), and our own command-line
clients pointed at it: `steer-sweep --judge openai --judge-url` and `simulate --user-url`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serving import EXPERIMENT, tiny_axis_and_config

from persona_axis.axis import save_axis
from persona_axis.cli import main
from persona_axis.control.capping import save_config
from persona_axis.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve_command(*args: str) -> Iterator[tuple[str, str]]:
    """(API base URL, the announcement line) of a `persona-axis serve ARGS --port 0` subprocess; stopped at the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "persona_axis.cli", "serve", *args, "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "serving" in line, line + process.stderr.read()
        yield line.split(" at ")[1].split()[0], line  # http://127.0.0.1:PORT/v1
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def served_cli(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(API base URL, axis file) of a `persona-axis serve` subprocess; stopped at the end."""
    work = tmp_path_factory.mktemp("serve-cli")
    axis, config = tiny_axis_and_config(load_model(tiny_model_dir, dtype="float32"))
    save_axis(axis, work / "axis.safetensors")
    save_config(config, work / "capping")
    with serve_command("--model", tiny_model_dir, "--dtype", "float32", "--axis", str(work / "axis.safetensors"),
                       "--config", str(work / "capping")) as (url, _):
        yield url, work / "axis.safetensors"


def test_without_an_axis_it_serves_plain_chat_and_refuses_persona_axis_requests(
        tiny_model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --model M` alone (e.g. as a --judge openai endpoint): plain completions, streamed or not, the
    official fields only; a persona_axis request is a one-line 400; options that need an axis are refused."""
    with serve_command("--model", tiny_model_dir, "--dtype", "float32") as (url, line):
        assert "no --axis" in line
        info = httpx.get(url + "/persona_axis").json()
        assert info["axis"] is False and info["default_layer"] is None and info["experiments"] == []
        body = {"model": "persona-axis", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "temperature": 0}
        reply = httpx.post(url + "/chat/completions", timeout=60, json=body).json()
        assert reply["usage"]["completion_tokens"] > 0 and isinstance(reply["choices"][0]["message"]["content"], str)
        assert "projections" not in reply.get("persona_axis", {})
        for extension, field in (({"cap": "layers_1:3-p0.5"}, "cap"), ({"steer": ["1@1"]}, "steer"),
                                 ({"projections": "token"}, "projections")):
            refused = httpx.post(url + "/chat/completions", timeout=60, json={**body, "persona_axis": extension})
            message = refused.json()["error"]["message"]
            assert refused.status_code == 400 and f"has no axis (started without --axis): persona_axis.{field}" \
                in message and "\n" not in message
    for flags in (["--config", "x"], ["--guard", "5"], ["--alert-below", "1"]):
        assert main(["serve", "--model", tiny_model_dir, *flags]) == 2
        [error] = capsys.readouterr().err.strip().splitlines()
        assert f"{flags[0]} need(s) --axis" in error


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
