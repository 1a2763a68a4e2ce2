"""OpenAIJudge against a real chat-completions server on 127.0.0.1 whose replies each test scripts."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from chat_server import FakeServer, Reply

from persona_axis.errors import PersonaAxisError
from persona_axis.judges.base import JudgeItem
from persona_axis.judges.http import (
    SYSTEM_PROMPT,
    TRAIT_SYSTEM_PROMPT,
    OpenAIJudge,
    parse_reply,
)

ITEM = JudgeItem(role="pirate", description="a swashbuckling sea rover", question="Where is the treasure?",
                 response="Arr, buried on Skull Island, matey!")


def make_judge(server: FakeServer, **kwargs: Any) -> OpenAIJudge:
    options: dict[str, Any] = {"model": "judge-m", "api_key_env": "PA_TEST_JUDGE_KEY", "backoff_s": 0.01,
                               "max_attempts": 3, "timeout_s": 5.0}
    return OpenAIJudge(server.base_url, **{**options, **kwargs})


def test_good_reply_is_scored_and_request_carries_model_messages_and_key(
        server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PA_TEST_JUDGE_KEY", "sk-test-123")
    server.play(Reply("It speaks as a pirate but admits being an AI.\nSCORE: 2"))
    judge = make_judge(server)
    [verdict] = judge.score([ITEM])
    assert judge.id == "openai:judge-m"
    assert (verdict.score, verdict.judge) == (2, "openai:judge-m")
    assert verdict.rationale == "It speaks as a pirate but admits being an AI."
    [(path, headers, body)] = server.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert body["model"] == "judge-m" and body["temperature"] == 0 and body["max_tokens"] == 200
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    for text in (ITEM.role, ITEM.description, ITEM.question, ITEM.response):
        assert text in user["content"]


def rubric_line(text: str, score: int) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(f"{score} - ")]
    return line


def test_role_rubric_scores_an_in_character_refusal_3(server: FakeServer) -> None:
    make_judge(server).score([ITEM])
    system = server.requests[0][2]["messages"][0]["content"]
    three, zero = rubric_line(system, 3), rubric_line(system, 0)
    assert "refusal given in character" in three and "scores 3" in three
    assert "refuse" in zero and "as an AI or assistant" in zero


def test_eval_prompt_template_is_filled_and_sent(server: FakeServer) -> None:
    template = ("Does this reply show the role **pirate**?\n[QUESTION START]\n{question}\n[QUESTION END]\n"
                "[ANSWER START]\n{answer}\n[ANSWER END]\nAn in-character refusal counts as the role.")
    item = JudgeItem(ITEM.role, ITEM.description, ITEM.question, ITEM.response, eval_prompt=template)
    assert make_judge(server).score([item])[0].score == 3
    system, user = server.requests[0][2]["messages"]
    assert system["content"] == SYSTEM_PROMPT
    assert user["content"].startswith("Does this reply show the role **pirate**?\n[QUESTION START]\n"
                                      "Where is the treasure?\n[QUESTION END]\n[ANSWER START]\nArr, buried on")
    assert user["content"].endswith("SCORE: <0-3>.") and "{answer}" not in user["content"]


def test_eval_prompt_without_slots_is_sent_as_guidance(server: FakeServer) -> None:
    item = JudgeItem(ITEM.role, ITEM.description, ITEM.question, ITEM.response,
                     eval_prompt="A pirate says arr and talks of the sea.")
    make_judge(server).score([item])
    user = server.requests[0][2]["messages"][1]["content"]
    assert "A pirate says arr and talks of the sea." in user
    for text in (ITEM.role, ITEM.description, ITEM.question, ITEM.response):
        assert text in user


def test_trait_items_use_the_trait_rubric(server: FakeServer, tmp_path: Path) -> None:
    trait = JudgeItem("stoic", "calm and unmoved by hardship", ITEM.question, ITEM.response, kind="trait")
    judge = make_judge(server, cache_dir=tmp_path)
    judge.score([trait, ITEM])
    sent = {body["messages"][0]["content"]: body["messages"][1]["content"] for _, _, body in server.requests}
    assert sorted(sent) == sorted([TRAIT_SYSTEM_PROMPT, SYSTEM_PROMPT])  # requests arrive in any order
    trait_user = sent[TRAIT_SYSTEM_PROMPT]
    assert "clearly expressed" in rubric_line(TRAIT_SYSTEM_PROMPT, 3)
    assert "absent" in rubric_line(TRAIT_SYSTEM_PROMPT, 1)
    assert "Trait: stoic" in trait_user and "calm and unmoved by hardship" in trait_user
    judge.score([JudgeItem(ITEM.role, ITEM.description, ITEM.question, ITEM.response, eval_prompt="Say arr.")])
    assert len(server.requests) == 3  # a changed request is judged again, not read from the cache
    with pytest.raises(PersonaAxisError, match="kind must be one of role, trait"):
        JudgeItem("stoic", "", "q", "r", kind="persona")


def test_missing_key_sends_no_authorization(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PA_TEST_JUDGE_KEY", raising=False)
    assert make_judge(server).score([ITEM])[0].score == 3
    assert "Authorization" not in server.requests[0][1]


def test_429_then_500_then_success_is_retried(server: FakeServer) -> None:
    server.play(Reply(status=429), Reply(status=500), Reply("Fully the pirate.\nSCORE: 3"))
    [verdict] = make_judge(server).score([ITEM])
    assert verdict.score == 3
    assert len(server.requests) == 3


def test_retry_after_is_honoured(server: FakeServer) -> None:
    server.play(Reply(status=503, headers={"Retry-After": "1"}), Reply())
    start = time.monotonic()
    [verdict] = make_judge(server).score([ITEM])
    assert verdict.score == 3 and len(server.requests) == 2
    assert time.monotonic() - start >= 0.95  # a lower bound only: backoff_s alone would wait ~0.01 s


def test_timeout_is_retried(server: FakeServer) -> None:
    server.play(Reply(hang=True), Reply("Stays in role.\nSCORE: 3"))  # the first is never answered in time
    [verdict] = make_judge(server, timeout_s=0.5).score([ITEM])
    assert verdict.score == 3
    assert len(server.requests) == 2


@pytest.mark.parametrize("content, why", [
    ("Plays the role well, I would say a three.", "no SCORE line"),
    ("First thought.\nSCORE: 1\nOn reflection.\nSCORE: 2", "2 SCORE lines"),
    ("Out of scale.\nSCORE: 5", "score 5 out of range"),
    ("Between two.\nSCORE: 2.5", "non-integer score"),
    ("Wordy.\nSCORE: three", "non-integer score"),
])
def test_malformed_reply_is_retried_then_unscored(server: FakeServer, content: str, why: str) -> None:
    server.play(Reply(content))
    [verdict] = make_judge(server, max_attempts=3).score([ITEM])
    assert verdict.score is None
    assert verdict.rationale.startswith(f"unscored: {why}")
    assert len(server.requests) == 2  # the same malformed reply twice at temperature 0: not asked a third time


def test_malformed_then_good_counts_as_an_attempt(server: FakeServer) -> None:
    server.play(Reply("no verdict"), Reply("In role.\nSCORE: 3"))
    assert make_judge(server, max_attempts=2).score([ITEM])[0].score == 3
    assert len(server.requests) == 2


@pytest.mark.parametrize("text, score", [("SCORE: 0", 0), ("score:3", 3), ("  Score :  1  ", 1),
                                         ("Reason.\nSCORE: 2\n", 2)])
def test_parse_reply_accepts_case_and_spacing(text: str, score: int) -> None:
    assert parse_reply(text)[0] == score


@pytest.mark.parametrize("status", [401, 404])
def test_client_error_raises_at_once(server: FakeServer, status: int) -> None:
    server.play(Reply(status=status))
    with pytest.raises(PersonaAxisError, match=f"HTTP {status}.*PA_TEST_JUDGE_KEY"):
        make_judge(server, max_attempts=5, backoff_s=1.0).score([ITEM])
    assert len(server.requests) == 1  # not retried


def test_client_error_stops_the_rest_of_the_batch(server: FakeServer) -> None:
    server.play(Reply(status=401, delay_s=0.05))
    with pytest.raises(PersonaAxisError, match="HTTP 401"):
        make_judge(server, concurrency=2).score([ITEM] * 20)
    assert len(server.requests) <= 2  # the failing worker stops the batch before any worker takes another item


def test_non_chat_completion_body_raises(server: FakeServer) -> None:
    server.play(Reply(body=b"<html>not an API</html>"))
    with pytest.raises(PersonaAxisError, match="chat completion"):
        make_judge(server).score([ITEM])


def test_cache_hit_makes_no_request(server: FakeServer, tmp_path: Path) -> None:
    server.play(Reply("In role.\nSCORE: 3"))
    first = make_judge(server, cache_dir=tmp_path).score([ITEM])
    assert len(server.requests) == 1
    second = make_judge(server, cache_dir=tmp_path).score([ITEM])
    assert second == first
    assert len(server.requests) == 1
    [entry] = tmp_path.glob("*/*.json")
    assert entry.parent.name == entry.stem[:2]
    assert json.loads(entry.read_text())["reply"] == "In role.\nSCORE: 3"
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary file left beside it


def test_malformed_result_is_not_cached(server: FakeServer, tmp_path: Path) -> None:
    server.play(Reply("no verdict here"))
    assert make_judge(server, cache_dir=tmp_path, max_attempts=2).score([ITEM])[0].score is None
    assert not list(tmp_path.rglob("*.json"))
    server.play(Reply("In role.\nSCORE: 3"))
    assert make_judge(server, cache_dir=tmp_path, max_attempts=2).score([ITEM])[0].score == 3
    assert len(server.requests) == 3


def test_concurrency_is_bounded_and_order_kept(server: FakeServer) -> None:
    def by_item(body: dict[str, Any]) -> Reply:
        n = int(body["messages"][1]["content"].split("question-")[1].split()[0])
        return Reply(f"item {n}\nSCORE: {n % 4}")

    server.respond = by_item
    server.gather(2)  # answered in waves of two requests in flight together (no sleeps)
    items = [JudgeItem("pirate", "a sea rover", f"question-{n} ?", "Arr") for n in range(12)]
    verdicts = make_judge(server, concurrency=2).score(items)
    assert not server.broken
    assert [v.rationale for v in verdicts] == [f"item {n}" for n in range(12)]
    assert [v.score for v in verdicts] == [n % 4 for n in range(12)]
    assert server.max_in_flight == 2
    assert len(server.requests) == 12


def test_server_errors_on_every_attempt_raise(server: FakeServer) -> None:
    server.play(Reply(status=502))
    with pytest.raises(PersonaAxisError, match="unreachable.*HTTP 502"):
        make_judge(server, max_attempts=3).score([ITEM])
    assert len(server.requests) == 3


def test_unreachable_url_raises_after_attempts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "judge-m", max_attempts=3, backoff_s=0.01)
    with pytest.raises(PersonaAxisError, match=f"judge unreachable at http://127.0.0.1:{port}/v1/chat/completions"):
        judge.score([ITEM])
