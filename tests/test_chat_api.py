"""ChatClient against a real chat-completions server on 127.0.0.1 whose replies each test scripts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from chat_server import FakeServer, Reply

from persona_axis.apps.chat_api import (
    MAX_DELAY_S,
    Answer,
    ChatClient,
    ReplyCache,
    Unparsed,
    cache_key,
    completion_text,
    retry_after_s,
)
from persona_axis.errors import PersonaAxisError


def client_at(server: FakeServer, **kwargs: Any) -> ChatClient:
    options: dict[str, Any] = {"who": "test endpoint", "api_key_env": "PA_TEST_CHAT_KEY", "backoff_s": 0.01,
                               "max_attempts": 3, "timeout_s": 5.0}
    return ChatClient(server.base_url, "chat-m", **{**options, **kwargs})


def question(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {n}"}]


def number(reply: str) -> int:
    """A strict parser for the tests: the reply must be an integer."""
    return int(reply)


def by_question(delay_s: float = 0.0) -> Any:
    """Answer 'question N' with N * 10 after delay_s."""
    return lambda body: Reply(str(int(body["messages"][-1]["content"].split()[1]) * 10), delay_s=delay_s)


def test_answers_come_back_in_order_with_their_raw_text(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PA_TEST_CHAT_KEY", "sk-chat")
    server.respond = by_question()
    answers = client_at(server, temperature=0.5, max_tokens=17).ask_all([question(n) for n in range(5)], number)
    assert answers == [Answer(n * 10, str(n * 10)) for n in range(5)]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-chat"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("chat-m", 0.5, 17)


def test_at_most_concurrency_requests_in_flight(server: FakeServer) -> None:
    server.respond = by_question()
    server.gather(3)  # answered in waves of three requests in flight together (no sleeps)
    answers = client_at(server, concurrency=3).ask_all([question(n) for n in range(9)], number)
    assert not server.broken
    assert [a.value for a in answers if isinstance(a, Answer)] == [n * 10 for n in range(9)]
    assert server.max_in_flight == 3 and len(server.requests) == 9


def test_rejected_replies_are_retried_then_unparsed(server: FakeServer) -> None:
    server.play(Reply("seven"), Reply("eight"), Reply("nine"), Reply("ten"))
    [answer] = client_at(server, max_attempts=4).ask_all([question(1)], number)
    assert isinstance(answer, Unparsed) and answer.attempts == 4 and "invalid literal" in answer.why
    assert len(server.requests) == 4


@pytest.mark.parametrize("temperature, requests", [(0.0, 2), (0.7, 4)])
def test_a_rejected_reply_repeated_at_temperature_0_is_not_asked_again(server: FakeServer, temperature: float,
                                                                       requests: int) -> None:
    """A deterministic server (temperature 0) answers a request the same way every time: once a rejected reply
    comes back word for word the attempts end; sampled, every attempt is used."""
    server.play(Reply("seven"))
    [answer] = client_at(server, max_attempts=4, temperature=temperature).ask_all([question(1)], number)
    assert isinstance(answer, Unparsed) and answer.attempts == requests and len(server.requests) == requests
    assert ("the same reply twice at temperature 0" in answer.why) == (temperature == 0)


def test_a_fatal_error_stops_a_waiting_retry_and_is_the_one_raised(server: FakeServer) -> None:
    """Question 1's fatal 403 is held until question 0 has taken its 20 s Retry-After (no race on the order)."""
    def respond(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["content"] == "question 0":
            return Reply(status=503, headers={"Retry-After": "20"})  # would wait 20 s before its next attempt
        return Reply(status=403, hang=True)

    client = client_at(server, concurrency=2)
    delay_s = client.delay_s

    def delay_then_let_the_fatal_answer_go(attempt: int, retry_after: float | None) -> float:
        delay = delay_s(attempt, retry_after)
        server.release()
        return delay

    client.delay_s = delay_then_let_the_fatal_answer_go  # type: ignore[method-assign]
    server.respond = respond
    start = time.monotonic()
    with pytest.raises(PersonaAxisError, match="test endpoint request failed with HTTP 403"):
        client.ask_all([question(0), question(1)], number)
    assert len(server.requests) == 2  # question 0 was not asked again
    assert time.monotonic() - start < MAX_DELAY_S  # the 20 s wait was cut short (a loose bound)


def test_transport_failure_on_every_attempt_names_the_endpoint(server: FakeServer) -> None:
    server.play(Reply(status=429))
    with pytest.raises(PersonaAxisError, match="test endpoint unreachable at .*/v1/chat/completions: HTTP 429 after 3"):
        client_at(server).ask_all([question(1)], number)
    assert len(server.requests) == 3


@pytest.mark.parametrize("body", [b"not json", b'{"choices": []}', b'{"choices": [{"text": "1"}]}',
                                  b'{"choices": [{"message": {"content": 5}}]}'])
def test_a_body_that_is_not_a_chat_completion_raises(server: FakeServer, body: bytes) -> None:
    server.play(Reply(body=body))
    with pytest.raises(PersonaAxisError, match="did not answer with a chat completion"):
        client_at(server).ask_all([question(1)], number)
    assert len(server.requests) == 1


def test_completion_text_is_strict() -> None:
    assert completion_text(b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}]}') == "hi"
    assert completion_text(b'{"choices": [{"message": {"content": null}}]}') == ""
    with pytest.raises(ValueError, match="not a chat completion"):
        completion_text(b'{"choices": {"message": "hi"}}')


def test_retry_after_and_backoff_delays(server: FakeServer) -> None:
    assert retry_after_s("2") == 2.0 and retry_after_s(" 120 ") == MAX_DELAY_S
    assert retry_after_s(None) is None and retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") is None
    client = client_at(server, backoff_s=0.5)
    assert client.delay_s(0, 3.0) == 3.0
    assert 0.5 * 8 <= client.delay_s(3, None) <= 0.5 * 8 + 0.05
    assert client.delay_s(10, None) == MAX_DELAY_S


def test_cache_serves_parsed_replies_without_a_request(server: FakeServer, tmp_path: Path) -> None:
    server.respond = by_question()
    first = client_at(server, cache_dir=tmp_path).ask_all([question(2)], number)
    second = client_at(server, cache_dir=tmp_path).ask_all([question(2)], number)
    assert first == second == [Answer(20, "20")] and len(server.requests) == 1
    path = ReplyCache(tmp_path).path(cache_key("chat-m", question(2)))
    assert json.loads(path.read_text()) == {"reply": "20"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cache_entry_the_parser_rejects_is_asked_again(server: FakeServer, tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    key = cache_key("chat-m", question(3))
    cache.put(key, "not a number")
    torn = cache.path(cache_key("chat-m", question(4)))
    torn.parent.mkdir(parents=True)
    torn.write_text("{torn", encoding="utf-8")
    server.respond = by_question()
    answers = client_at(server, cache_dir=tmp_path).ask_all([question(3), question(4)], number)
    assert answers == [Answer(30, "30"), Answer(40, "40")] and len(server.requests) == 2
    assert cache.get(key) == "30"


def test_rejected_replies_are_not_cached(server: FakeServer, tmp_path: Path) -> None:
    server.play(Reply("seven"))
    client_at(server, cache_dir=tmp_path, max_attempts=2).ask_all([question(1)], number)
    assert not list(tmp_path.rglob("*"))


def test_options_are_checked() -> None:
    with pytest.raises(PersonaAxisError, match="the judge needs concurrency >= 1"):
        ChatClient("http://127.0.0.1:9/v1", "m", who="judge", concurrency=0)
