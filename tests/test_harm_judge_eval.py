"""`judge-eval --harm` measuring an HTTP harm judge on the held-out pyrit rows: against our own server with the tiny
random model (whose answers never parse: unscored, not guessed), against a scripted server on 127.0.0.1 whose
answers give hand-computed figures, and against garbage and unreachable endpoints (one-line errors)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from chat_server import FakeServer, Reply
from conftest import tiny_config
from serving import tiny_axis_and_config

from persona_axis.apps import chat_api
from persona_axis.apps.server import PersonaServer, ServerLimits
from persona_axis.apps.server_http import build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.cli import main
from persona_axis.evals.harm_http import build_messages
from persona_axis.evals.harm_judge_eval import held_out_metrics, held_out_rows, verdict_metrics
from persona_axis.evals.harm_judges import HarmItem, HarmVerdict, make_harm_judge
from persona_axis.model.loading import wrap_model

HARMFUL = "Serves the request in detail.\nREFUSED: 0\nCONVINCING: 5\nSPECIFIC: 5"
HARMLESS = "Declines.\nREFUSED: 1\nCONVINCING: 1\nSPECIFIC: 1"
GARBAGE = "I would rather not use your format."


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["judge-eval", "--harm", *argv, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def user_message(row: Any) -> str:
    return build_messages(HarmItem(row.objective, row.response))[1]["content"]


# -- our own server as the judge ------------------------------------------------------------------------------


@pytest.fixture()
def own_server(tokenizer: Any) -> Iterator[str]:
    """`persona-axis serve` in a thread around a tiny random Llama; its context (2048) holds the first rows' prompts."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = 2048
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    lm = wrap_model(model, tokenizer, name="tiny-llama")
    axis, capping = tiny_axis_and_config(lm)
    with BackgroundServer(build_app(PersonaServer(lm, axis, capping, ServerLimits()))) as background:
        yield background.url


def test_our_server_as_judge_is_measured_and_its_unparsable_answers_are_unscored(
        own_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = cli_json(capsys, "--judge", "openai", "--judge-url", own_server + "/v1", "--judge-model", "tiny",
                      "--limit", "4")
    assert (report["n_test"], report["limit"]) == (4, 4) and report["n_held_out"] > 50
    offline_id = report["offline_judge"]
    assert list(report["judges"]) == [offline_id, "openai-harm:tiny"]
    offline, served = report["judges"][offline_id], report["judges"]["openai-harm:tiny"]
    assert (offline["n"], offline["n_scored"], offline["n_unscored"], offline["coverage"]) == (4, 4, 0, 1.0)
    # A random model never writes the three rubric lines: every row is unscored and none is counted right or wrong.
    assert (served["n"], served["n_scored"], served["n_unscored"], served["coverage"]) == (4, 0, 4, 0.0)
    assert served["tp"] + served["fp"] + served["fn"] + served["tn"] == 0
    assert all(served[k] is None for k in ("accuracy", "precision", "recall", "f1", "specificity",
                                          "majority_baseline"))
    assert report["baseline"]["n"] == 4 and report["baseline"]["accuracy"] is not None


# -- a scripted judge with figures computed by hand -------------------------------------------------------------

# The first 8 held-out rows in digest order, by human label, and what the scripted judge answers for each:
#   label    T        F        F         F         F        T         T        F
#   judge    harmful  harmful  harmless  harmless  garbage  harmless  harmful  harmless
#   outcome  tp       fp       tn        tn        unscored fn        tp       tn
# scored 7 of 8: tp 2, fp 1, fn 1, tn 3 -> accuracy 5/7, precision 2/3, recall 2/3, F1 2/3, specificity 3/4.
# The training majority is "not harmful": right on 5 of all 8 rows, on 4 of the 7 scored.
LABELS = [True, False, False, False, False, True, True, False]
SCRIPT = [HARMFUL, HARMFUL, HARMLESS, HARMLESS, GARBAGE, HARMLESS, HARMFUL, HARMLESS]


@pytest.fixture()
def scripted(server: FakeServer) -> FakeServer:
    """The fake server answering SCRIPT[i] for the i-th held-out row, and HTTP 400 for any other request."""
    _, rows = held_out_rows()
    answers = {user_message(row): reply for row, reply in zip(rows, SCRIPT)}
    assert [row.harmful for row in rows[:8]] == LABELS  # pyrit's pinned labels, in the fixed order
    server.respond = lambda body: (Reply(answers[body["messages"][1]["content"]])
                                   if body["messages"][1]["content"] in answers else Reply(status=400))
    return server


def test_scripted_judge_gives_the_hand_computed_figures(scripted: FakeServer) -> None:
    judge = make_harm_judge("openai", url=scripted.base_url, model="scripted", key_env="PA_TEST_HARM_KEY")
    report = held_out_metrics([judge], limit=8)
    j = report["judges"]["openai-harm:scripted"]
    assert (j["n"], j["n_scored"], j["n_unscored"]) == (8, 7, 1)
    assert (j["tp"], j["fp"], j["fn"], j["tn"]) == (2, 1, 1, 3)
    assert j["coverage"] == pytest.approx(7 / 8)
    assert j["accuracy"] == pytest.approx(5 / 7)
    assert j["precision"] == pytest.approx(2 / 3) and j["recall"] == pytest.approx(2 / 3)
    assert j["f1"] == pytest.approx(2 / 3)
    assert j["sensitivity"] == pytest.approx(2 / 3) and j["specificity"] == pytest.approx(3 / 4)
    assert j["majority_baseline"] == pytest.approx(4 / 7)
    assert report["baseline"] == {"predicts": "not harmful", "n": 8, "accuracy": pytest.approx(5 / 8)}
    assert report["majority_baseline"] == pytest.approx(5 / 8) and report["n_test_harmful"] == 3
    # Only the 8 rows were sent (the garbage one twice: the same reply again at temperature 0, then unscored).
    _, rows = held_out_rows()
    sent = [body["messages"][1]["content"] for _, _, body in scripted.requests]
    assert set(sent) == {user_message(row) for row in rows[:8]} and len(sent) == 7 + 2


def test_cli_prints_each_judge_with_coverage(scripted: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["judge-eval", "--harm", "--judge", "openai", "--judge-url", scripted.base_url,
                 "--judge-model", "scripted", "--limit", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("harm judges on the first 8 (in sha256(objective NUL response) order) of the ")
    assert out[1] == 'baseline: always "not harmful" (the training majority), accuracy 0.625 on the 8 rows'
    assert out[2].startswith("offline-harm:") and "scored 8/8" in out[2]
    assert out[3] == ("openai-harm:scripted: scored 7/8 (coverage 87.5%, unscored 1); on the scored rows accuracy "
                      "0.714 (baseline 0.571), precision 0.667, recall 0.667, F1 0.667, sensitivity 0.667, "
                      "specificity 0.750")


def test_unscored_verdicts_are_neither_right_nor_wrong() -> None:
    def verdict(harmful: bool | None) -> HarmVerdict:
        return HarmVerdict(harmful, None if harmful is None else float(harmful), "", "j")

    m = verdict_metrics([True, False, True, False], [verdict(True), verdict(None), verdict(None), verdict(True)],
                        majority=False)
    assert (m["n_scored"], m["n_unscored"], m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 1, 0, 0)
    assert (m["accuracy"], m["precision"], m["recall"], m["specificity"]) == (0.5, 0.5, 1.0, 0.0)
    nothing = verdict_metrics([True, False], [verdict(None), verdict(None)], majority=False)
    assert nothing["coverage"] == 0.0 and nothing["accuracy"] is None and nothing["f1"] is None


# -- garbage and unreachable endpoints -----------------------------------------------------------------------------


def test_garbage_rubric_answers_are_unscored(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.play(Reply(GARBAGE))
    report = cli_json(capsys, "--judge", "openai", "--judge-url", server.base_url, "--judge-model", "g",
                      "--limit", "3")
    j = report["judges"]["openai-harm:g"]
    assert (j["n_scored"], j["n_unscored"], j["coverage"], j["accuracy"]) == (0, 3, 0.0, None)
    assert report["judges"][report["offline_judge"]]["n_scored"] == 3  # the offline judge is measured beside it


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    [line] = captured.err.strip().splitlines()
    return line


def test_a_body_that_is_not_a_chat_completion_is_a_one_line_error(
        server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.play(Reply(body=b"<html>gateway says hello</html>"))
    line = one_line_error(capsys, ["judge-eval", "--harm", "--judge", "openai", "--judge-url", server.base_url,
                                   "--judge-model", "g", "--limit", "2"])
    assert "did not answer with a chat completion" in line


def test_unreachable_judge_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_api, "MAX_DELAY_S", 0.01)  # the retries' backoff, cut so the test is quick
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket is closed
    line = one_line_error(capsys, ["judge-eval", "--harm", "--judge", "openai", "--judge-url",
                                   f"http://127.0.0.1:{port}/v1", "--judge-model", "g", "--limit", "2"])
    assert line.startswith("persona-axis: error: harm judge unreachable")


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert "--limit must be at least 1" in one_line_error(capsys, ["judge-eval", "--harm", "--limit", "0"])
    assert "needs --judge-url" in one_line_error(capsys, ["judge-eval", "--harm", "--judge", "openai"])
    assert "unknown harm judge 'offline-learned'" in one_line_error(
        capsys, ["judge-eval", "--harm", "--judge", "offline-learned"])
    assert "--limit applies to judge-eval --harm only" in one_line_error(capsys, ["judge-eval", "x.jsonl", "--limit", "3"])
    for extra in (["x.jsonl"], ["--fold", "B"], ["--threshold", "1.5"]):
        assert "it takes no LABELS, --fold or --threshold" in one_line_error(capsys, ["judge-eval", "--harm", *extra])
