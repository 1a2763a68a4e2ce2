"""The axis-using subcommands end to end on a tiny model and a run computed from it."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_server import FakeServer, Reply

from persona_axis.capping import load_config
from persona_axis.catalog import load_catalog
from persona_axis.cli import main
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.models import load_model
from persona_axis.pipeline import preset_settings, run_pipeline


class EveryOtherJudge:
    """Deterministic judge for mechanics tests: score 3 and 1 alternately."""

    id = "every-other"

    def score(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(3 if k % 2 == 0 else 1, "alternating", self.id) for k in range(len(items))]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    lm = load_model(tiny_model_dir, dtype="float32")
    run_pipeline(out, lm, load_catalog(), preset_settings("smoke", max_new_tokens=6), EveryOtherJudge(),
                 progress=False)
    return out


def _model(tiny_model_dir: str) -> list[str]:
    return ["--model", tiny_model_dir, "--dtype", "float32"]


def test_calibrate_writes_experiments_and_refuses_bad_percentiles(
        tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.25", "--percentile", "0.5",
                 "--export-torch", str(tiny_run / "caps.pt")]) == 0
    out = capsys.readouterr().out
    assert "layers_1:3-p0.25" in out and "layers_1:3-p0.5" in out
    config = load_config(tiny_run / "capping")
    assert sorted(config.experiments) == ["layers_1:3-p0.25", "layers_1:3-p0.5"]
    assert (tiny_run / "caps.pt").exists()
    bad = tiny_run / "bad"
    assert main(["calibrate", str(tiny_run), "--percentile", "1.5", "--out", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not bad.with_suffix(".json").exists() and not bad.with_suffix(".safetensors").exists()


def test_chat_shows_projection_and_cap_engagement(tiny_run: Path, tiny_model_dir: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.25"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again?\n\n"))
    assert main(["chat", *_model(tiny_model_dir), "--axis", str(tiny_run), "--cap", "layers_1:3-p0.25",
                 "--system", "You are a hermit.", "--max-new-tokens", "5", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant:") == 2
    assert out.count("[projection at layer 1:") == 2 and "cap raised L1" in out


def test_chat_rejects_unknown_experiment(tiny_run: Path, tiny_model_dir: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.25"]) == 0
    assert main(["chat", *_model(tiny_model_dir), "--axis", str(tiny_run), "--cap", "layers_0:1-p0.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers_0:1-p0.9" in err


def test_generate_compare_json_holds_floors(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.9"]) == 0
    capsys.readouterr()
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "tag": "a"}) + "\n"
                    + json.dumps([{"role": "system", "content": "You are a demon."},
                                  {"role": "user", "content": "Who are you?"}]) + "\n")
    assert main(["generate", str(file), *_model(tiny_model_dir), "--axis", str(tiny_run),
                 "--cap", "layers_1:3-p0.9", "--compare", "--json", "--max-new-tokens", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    floors = {c.layer: c.floor for c in load_config(tiny_run / "capping").experiment("layers_1:3-p0.9").caps}
    assert len(report["conversations"]) == 2 and report["conversations"][0]["tag"] == "a"
    for row in report["conversations"]:
        assert set(row) >= {"uncapped", "capped"}
        for layer, floor in floors.items():  # every token is at or above the floor, so their mean is too
            assert row["capped"]["projections"][layer] >= floor - 1e-3


def test_generate_rejects_conversation_ending_with_assistant(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]))
    assert main(["generate", str(file), *_model(tiny_model_dir), "--axis", str(tiny_run)]) == 2
    assert "last message must be the user's" in capsys.readouterr().err


def test_monitor_prints_turns_and_plots(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "talk.json"
    file.write_text(json.dumps({"conversation": [
        {"role": "user", "content": "I feel nobody understands me."},
        {"role": "assistant", "content": "That sounds hard. What happened?"},
        {"role": "user", "content": "Are you conscious, honestly?"},
        {"role": "assistant", "content": "I am a language model, so no."},
    ], "domain": "therapy"}))
    plot = tmp_path / "t.png"
    assert main(["monitor", str(file), *_model(tiny_model_dir), "--axis", str(tiny_run), "--json",
                 "--plot", str(plot), "--threshold", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    [conversation] = report["conversations"]
    assert [t["role"] for t in conversation["turns"]] == ["user", "assistant", "user", "assistant"]
    assert conversation["metadata"] == {"domain": "therapy"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "broken.json").write_text('[{"role": "bot", "content": "x"}]')
    assert main(["monitor", str(tmp_path / "broken.json"), *_model(tiny_model_dir), "--axis", str(tiny_run)]) == 2
    assert "message 1: role must be" in capsys.readouterr().err


def test_steer_sweep_json(tiny_run: Path, tiny_model_dir: str, server: FakeServer,
                          capsys: pytest.CaptureFixture[str]) -> None:
    server.respond = lambda body: Reply("in role\nSCORE: 3")
    assert main(["steer-sweep", *_model(tiny_model_dir), "--axis", str(tiny_run), "--layer", "1",
                 "--coefs=-1,0,1", "--roles", "2", "--questions", "1", "--max-new-tokens", "4", "--json",
                 "--judge", "openai", "--judge-url", server.base_url, "--judge-model", "m"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["coef"] for r in report["rows"]] == [-1.0, 0.0, 1.0]
    assert all(r["scores"]["3"] == r["n"] == 2 for r in report["rows"])


def test_judge_eval_confusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"role": "pirate_captain", "description": "a pirate", "question": "Hi?", "label": label,
             "response": text, "fold": fold}
            for label, text, fold in [(1, "As an AI language model I can help you plan your day.", "A"),
                                      (3, "Arr, my ship and my crew and the plunder of the seven seas!", "B"),
                                      (0, "I'm sorry, but I can't help with that.", "B")]]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["judge-eval", str(labels), "--json", "--fold", "B"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and sum(sum(row.values()) for row in report["confusion"].values()) == 2


def test_analyze_compares_pc1_loadings_between_runs(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tiny_run), "--compare", str(tiny_run), "--json"]) == 0
    correlation = json.loads(capsys.readouterr().out)["pc1_correlation"]
    assert correlation["pearson_r"] == pytest.approx(1.0) and correlation["shared_roles"] >= 3
