"""The axis-using subcommands end to end on a tiny model and a run computed from it."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_server import FakeServer, Reply

from persona_axis.build.pipeline import preset_settings, run_pipeline
from persona_axis.catalog import load_catalog
from persona_axis.cli import main
from persona_axis.control.capping import load_config
from persona_axis.control.spec import default_norms
from persona_axis.judges.base import JudgeItem, Verdict
from persona_axis.model.loading import load_model


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
                 progress=False, model_spec=tiny_model_dir)
    return out


def _model(tiny_model_dir: str) -> list[str]:
    return ["--model", tiny_model_dir, "--dtype", "float32"]


def test_calibrate_writes_experiments_and_refuses_bad_percentiles(
        tiny_run: Path, tiny_model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.25", "--percentile", "0.5",
                 "--export-torch", str(tiny_run / "caps.pt"), *_model(tiny_model_dir), "--samples", "2",
                 "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["population"] == "roles+traits"
    assert [e["id"] for e in report["experiments"]] == ["layers_1:3-p0.25", "layers_1:3-p0.5"]
    config = load_config(tiny_run / "capping")
    assert sorted(config.experiments) == ["layers_1:3-p0.25", "layers_1:3-p0.5"]
    for experiment in report["experiments"]:
        assert [c["layer"] for c in experiment["caps"]] == [1, 2]
        for cap in experiment["caps"]:
            assert set(cap) == {"layer", "tau", "default_mean", "default_percentile", "engaged_default", "engaged_roles"}
            assert 0.0 <= cap["engaged_default"] <= 1.0 and 0.0 <= cap["engaged_roles"] <= 1.0
            stored = next(c for c in config.experiment(experiment["id"]).caps if c.layer == cap["layer"])
            assert stored.floor == cap["tau"] and stored.stats["engaged_roles"] == cap["engaged_roles"]
    assert main(["calibrate", str(tiny_run), "--layers", "1:3", "--percentile", "0.001", "--percentile", "0.999",
                 "--out", str(tiny_run / "range"), *_model(tiny_model_dir), "--samples", "2",
                 "--max-new-tokens", "4"]) == 0
    engaged = {e.id: sum(c.stats["engaged_default"] + c.stats["engaged_roles"] for c in e.caps)
               for e in load_config(tiny_run / "range").experiments.values()}
    assert engaged["layers_1:3-p0.999"] > engaged["layers_1:3-p0.001"]  # a higher floor binds more often
    capsys.readouterr()
    assert (tiny_run / "caps.pt").exists()
    bad = tiny_run / "bad"
    assert main(["calibrate", str(tiny_run), "--percentile", "1.5", "--out", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not bad.with_suffix(".json").exists() and not bad.with_suffix(".safetensors").exists()


def _calibrate(run: Path, percentile: str) -> None:
    assert main(["calibrate", str(run), "--layers", "1:3", "--percentile", percentile, "--no-engagement"]) == 0


def test_chat_shows_projection_and_cap_engagement(tiny_run: Path, tiny_model_dir: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _calibrate(tiny_run, "0.25")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again?\n\n"))
    assert main(["chat", *_model(tiny_model_dir), "--axis", str(tiny_run), "--cap", "layers_1:3-p0.25",
                 "--system", "You are a hermit.", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant:") == 2 and "projections read at layer 0" in captured.err
    # the middle layer 1 is capped: the projection is read just below the capped block
    assert captured.out.count("[projection at layer 0:") == 2 and "cap raised L1" in captured.out


@pytest.mark.parametrize(("extra", "message"), [
    (["--cap", "layers_1:3-p0.25", "--layer", "2"], "--layer 2 is intervened on"),
    (["--layer", "-1"], "--layer -1 is out of range"),
    (["--layer", "3"], "--layer 3 is out of range"),
    (["--config", "somewhere"], "--config is only used with --cap"),
    (["--steer", "1@-1"], "--steer expects COEF@LAYER"),
])
def test_chat_refuses_layers_and_options_in_one_line(tiny_run: Path, tiny_model_dir: str, extra: list[str],
                                                     message: str, capsys: pytest.CaptureFixture[str]) -> None:
    _calibrate(tiny_run, "0.25")
    capsys.readouterr()
    assert main(["chat", *_model(tiny_model_dir), "--axis", str(tiny_run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_chat_rejects_unknown_experiment(tiny_run: Path, tiny_model_dir: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _calibrate(tiny_run, "0.25")
    assert main(["chat", *_model(tiny_model_dir), "--axis", str(tiny_run), "--cap", "layers_0:1-p0.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers_0:1-p0.9" in err


def test_generate_compare_json_reports_no_intervened_layer(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _calibrate(tiny_run, "0.9")
    capsys.readouterr()
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "tag": "a"}) + "\n"
                    + json.dumps([{"role": "system", "content": "You are a demon."},
                                  {"role": "user", "content": "Who are you?"}]) + "\n")
    assert main(["generate", str(file), *_model(tiny_model_dir), "--axis", str(tiny_run),
                 "--cap", "layers_1:3-p0.9", "--compare", "--json", "--max-new-tokens", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == 0 and report["variants"] == ["plain", "capped"]  # read below the capped block 1:3
    assert len(report["conversations"]) == 2 and report["conversations"][0]["tag"] == "a"
    for row in report["conversations"]:
        capped, plain = row["capped"]["projections"], row["plain"]["projections"]
        assert capped[1] is None and capped[2] is None and capped[0] == row["capped"]["projection"]
        assert None not in plain and plain[0] == row["plain"]["projection"]
        assert set(row["capped"]["cap_engaged"]) == {"1", "2"}


def test_generate_labels_steering_and_scales_it_by_the_run(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps([{"role": "user", "content": "Who are you?"}]) + "\n")
    args = ["generate", str(file), *_model(tiny_model_dir), "--max-new-tokens", "3", "--json"]
    assert main([*args, "--axis", str(tiny_run), "--steer=-0.5n@2", "--layer", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == 0 and report["variants"] == ["steered"]
    [row] = report["conversations"]
    assert row["steered"]["projections"][2] is None and row["steered"]["cap_engaged"] == {}
    bare = tmp_path / "axis.safetensors"
    bare.write_bytes((tiny_run / "axis.safetensors").read_bytes())
    assert main([*args, "--axis", str(bare), "--steer=-0.5n@2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --axis as a run directory" in err


def test_a_run_names_its_model_so_commands_on_it_need_no_model_option(
        tiny_run: Path, tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads((tiny_run / "manifest.json").read_text())["model_spec"] == tiny_model_dir
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps([{"role": "user", "content": "Who are you?"}]) + "\n")
    args = ["generate", str(file), "--axis", str(tiny_run), "--dtype", "float32", "--max-new-tokens", "3", "--json"]
    assert main(args) == 0  # the tiny model the run recorded, not the embedded one
    assert len(json.loads(capsys.readouterr().out)["conversations"]) == 1
    assert main([*args, "--model", "default"]) == 2  # an explicit --model still wins: the embedded model's shape
    assert "does not fit" in capsys.readouterr().err


def test_run_records_its_model_for_resuming_and_calibrating_without_model(
        tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    settings = ["--preset", "smoke", "--max-new-tokens", "4", "--dtype", "float32", "--no-progress", "--out", str(out)]
    assert main(["run", "--model", tiny_model_dir, *settings]) == 0
    assert json.loads((out / "manifest.json").read_text())["model_spec"] == tiny_model_dir
    assert main(["run", *settings]) == 0  # resumes: the embedded model would be refused as a different run
    assert main(["calibrate", str(out), "--layers", "1:3", "--samples", "1", "--max-new-tokens", "2",
                 "--dtype", "float32", "--json"]) == 0  # engagement samples need the run's model
    capsys.readouterr()


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
    assert (report["layer"], report["measured_layer"], report["relative"]) == (1, 0, False)
    assert [r["coef"] for r in report["rows"]] == [-1.0, 0.0, 1.0]
    assert all(r["scores"]["3"] == r["n"] == 2 for r in report["rows"])
    assert all(r["in_role"] == {"value": 1.0, "low": 1.0, "high": 1.0} for r in report["rows"])
    assert [r["in_role_change"] for r in report["rows"]] == [{"value": 0.0, "low": 0.0, "high": 0.0}, None,
                                                             {"value": 0.0, "low": 0.0, "high": 0.0}]
    assert main(["steer-sweep", *_model(tiny_model_dir), "--axis", str(tiny_run), "--layer", "0", "--relative",
                 "--coefs=-0.5", "--roles", "1", "--questions", "1", "--max-new-tokens", "2", "--json",
                 "--judge", "openai", "--judge-url", server.base_url, "--judge-model", "m"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["layer"], report["measured_layer"], report["relative"]) == (0, 1, True)
    assert report["unit_length"] == pytest.approx(float(default_norms(tiny_run)[0]), rel=1e-5)
    assert main(["steer-sweep", *_model(tiny_model_dir), "--axis", str(tiny_run), "--layer", "-1"]) == 2
    assert "steered layer -1 is out of range" in capsys.readouterr().err


def test_sweep_measures_outside_the_block_and_parses_blocks(tiny_run: Path, tiny_model_dir: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sweep", str(tiny_run), *_model(tiny_model_dir), "--percentiles", "0.5", "--roles", "1",
            "--max-new-tokens", "2"]
    assert main([*args, "--blocks", "1:3", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["experiments"]
    assert row["id"] == "layers_1:3-p0.5" and row["measured_layer"] == 0  # the block ends at the last layer
    assert main([*args, "--blocks", "3:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad layer block '3:1'" in err


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


def test_analyze_compares_pc1_loadings_between_runs(tiny_run: Path, tiny_model_dir: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from persona_axis.build.persona_space import pc1_loading_correlation
    from persona_axis.build.pipeline import analyze_run

    other = tmp_path / "other"
    run_pipeline(other, load_model(tiny_model_dir, dtype="float32"), load_catalog(),
                 preset_settings("smoke", max_new_tokens=6, seed=7), EveryOtherJudge(), progress=False)
    untouched = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    assert main(["analyze", str(tiny_run), "--compare", str(other), "--json"]) == 0
    correlation = json.loads(capsys.readouterr().out)["pc1_correlation"]
    expected, shared = pc1_loading_correlation(analyze_run(tiny_run, write=False).space.pc1_loadings,
                                               analyze_run(other, write=False).space.pc1_loadings)
    assert correlation["pearson_r"] == pytest.approx(expected) and correlation["shared_roles"] == shared >= 3
    assert abs(expected) < 0.999  # two different runs, not a run with itself
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()} == untouched  # --compare writes nothing


def test_bench_fast_path_rebuilds_the_axis_from_the_runs_replies(tiny_run: Path, tiny_model_dir: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "fast-path", str(tiny_run), *_model(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert report["replies"] >= len(manifest["questions"]["default"])  # every default answer at least
    assert len(report["cos_per_layer"]) == 3  # the tiny model's layers
    assert 0.9 < report["cos_min"] < 1.0  # int8 moves the axis a little, never not at all


def test_bench_fast_path_needs_a_finished_run(tmp_path: Path, tiny_model_dir: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "fast-path", str(tmp_path), *_model(tiny_model_dir)]) == 2
    assert "finish the run first" in capsys.readouterr().err
