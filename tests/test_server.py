"""The OpenAI-compatible server, over real HTTP on 127.0.0.1: the official client, streaming with projections,
batching equivalence across concurrent requests, 400/429/504, disconnects, the context limits, our own clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from serving import EXPERIMENT, running_server

from persona_axis.apps.server import ServerLimits
from persona_axis.apps.user_simulators import DomainPersona, OpenAIUserSimulator
from persona_axis.judges.base import JudgeItem
from persona_axis.judges.http import OpenAIJudge

HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    tokenizer = request.getfixturevalue("tokenizer_module")
    with running_server(tokenizer) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def tokenizer_module(embedded_dir: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(embedded_dir)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _ask(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "persona-axis", **body}, timeout=60)


def test_the_official_client_works_unchanged_streamed_and_not(served: tuple[str, Any]) -> None:
    url, _ = served
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["persona-axis"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    plain = client.chat.completions.create(model="persona-axis", messages=HELLO, max_tokens=12, temperature=0,
                                           extra_body={"persona_axis": {"cap": EXPERIMENT}})
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage is not None
    extension = plain.model_extra["persona_axis"]  # type: ignore[index]
    assert len(extension["projections"]) == plain.usage.completion_tokens > 0
    assert set(extension["cap_engaged"]) == {"1", "2"} and extension["cap_engaged"]["1"] > 0
    chunks = list(client.chat.completions.create(model="persona-axis", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"persona_axis": {"cap": EXPERIMENT}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    per_token = [c.model_extra["persona_axis"] for c in chunks  # type: ignore[index]
                 if c.choices and not c.choices[0].finish_reason and c.model_extra.get("persona_axis")]
    assert text == plain.choices[0].message.content
    assert [t["projection"] for t in per_token] == pytest.approx(extension["projections"], abs=1e-5)
    assert all(t["capped_layers"] for t in per_token)  # the floor is above the random model: the cap acts
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(per_token)


def test_concurrent_requests_with_different_caps_get_what_they_get_alone(served: tuple[str, Any]) -> None:
    """Four requests with different interventions decode in the SAME engine steps, and each gets what it got alone.

    The engine is held until all four wait, so they are admitted together; a wrapper on the engine's
    decode step records which prompts each step fed (test-side only), proving the batch was shared.
    """
    url, server = served
    bodies = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}], "max_tokens": 10 + i,
               "temperature": 0.8, "seed": i, "persona_axis": ext}
              for i, ext in enumerate([{"cap": EXPERIMENT}, {}, {"steer": [{"layer": 1, "coef": -2}]},
                                       {"cap": EXPERIMENT, "steer": [{"layer": 0, "coef": 1}], "layer": 2}])]
    alone = [_ask(url, **b).json() for b in bodies]
    engine = server.engine
    prompts = {tuple(server.parse({"model": "m", **b}).prompt_ids): i for i, b in enumerate(bodies)}
    assert len(prompts) == 4
    steps: list[list[int]] = []  # per decode step, the bodies (by index) whose rows it fed
    gate, step, decode = threading.Semaphore(0), engine.step, engine._decode

    def recording_decode() -> None:
        steps.append(sorted(prompts.get(tuple(row.request.prompt_ids), -1) for row in engine.rows if row is not None))
        decode()

    engine.step = lambda: (gate.acquire(), step())[1]
    engine._decode = recording_decode
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            running = [pool.submit(_ask, url, **b) for b in bodies]
            _wait(lambda: len(engine.waiting) == len(bodies))  # all four queued before the engine may step
            gate.release(10_000)
            together = [r.result().json() for r in running]
    finally:
        gate.release(10_000)
        del engine.step, engine._decode  # back to the class's methods
    shared = [s for s in steps if s == [0, 1, 2, 3]]
    assert steps[0] == [0, 1, 2, 3]  # admitted together: the first decode step feeds all four rows
    assert len(shared) >= 9  # and they keep sharing steps until the shortest reply (10 tokens) is nearly done
    for a, t in zip(alone, together):
        assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert t["persona_axis"]["projections"] == pytest.approx(a["persona_axis"]["projections"], abs=1e-5)
    assert together[1]["persona_axis"]["cap_engaged"] == {} and together[0]["persona_axis"]["cap_engaged"]
    assert together[3]["persona_axis"]["layer"] == 2 and together[3]["persona_axis"]["floor"] == 0.5


@pytest.mark.parametrize("body, message", [
    ({"messages": HELLO, "persona_axis": {"cap": "layers_9:12-p0.5"}}, "unknown capping experiment"),
    ({"messages": HELLO, "persona_axis": {"layer": 7}}, "out of range"),
    ({"messages": HELLO, "persona_axis": {"steer": [{"layer": 1}]}}, "'coef'"),
    ({"messages": HELLO, "persona_axis": {"colour": 1}}, "unknown persona_axis field"),
    ({"messages": HELLO, "n": 2}, "n = 1"),
    ({"messages": []}, "non-empty list"),
    ({"messages": HELLO, "temperature": "hot"}, "'temperature'"),
])
def test_bad_requests_get_a_one_line_400(served: tuple[str, Any], body: dict[str, Any], message: str) -> None:
    response = _ask(served[0], **body)
    error = response.json()["error"]["message"]
    assert response.status_code == 400 and message in error and "\n" not in error


def test_malformed_json_is_a_400_and_nothing_in_flight_is_affected(served: tuple[str, Any]) -> None:
    url, _ = served
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_ask, url, messages=HELLO, max_tokens=40, temperature=0,
                              persona_axis={"ignore_eos": True})
        bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=10)
        ok = running.result()
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40


def test_max_tokens_is_cut_to_the_context_and_long_conversations_slide(served: tuple[str, Any]) -> None:
    url, server = served
    reply = _ask(url, messages=HELLO, max_tokens=100000, temperature=0, persona_axis={"ignore_eos": True}).json()
    assert reply["usage"]["total_tokens"] == server.context == 512
    assert reply["choices"][0]["finish_reason"] == "length"
    long = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "words " * 60} for i in range(30)]
    slid = _ask(url, messages=long + [{"role": "user", "content": "And now?"}], max_tokens=8).json()
    dropped = slid["persona_axis"]["window"]["dropped_messages"]
    assert 0 < dropped < 30 and slid["usage"]["prompt_tokens"] <= 512 - 8 and slid["usage"]["total_tokens"] <= 512
    huge = _ask(url, messages=[{"role": "user", "content": "word " * 2000}], max_tokens=8)
    assert huge.status_code == 400 and "longer than" in huge.json()["error"]["message"]


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_row(tokenizer_module: Any) -> None:
    with running_server(tokenizer_module, ServerLimits(max_rows=1, max_waiting=1)) as (url, server):
        gate, step = threading.Semaphore(0), server.engine.step
        server.engine.step = lambda: (gate.acquire(), step())[1]  # the engine steps only when the test lets it
        try:
            _full_queue_then_disconnect(url, server, gate)
        finally:
            gate.release(10_000)


def _full_queue_then_disconnect(url: str, server: Any, gate: threading.Semaphore) -> None:
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", url + "/v1/chat/completions",
            json={"model": "m", "messages": HELLO, "max_tokens": 400, "stream": True,
                  "persona_axis": {"ignore_eos": True}}) as first:
        gate.release(2)  # admit, then feed the first token
        next(line for line in first.iter_lines() if '"projection"' in line)
        results: list[httpx.Response] = []
        queued = threading.Thread(target=lambda: results.append(_ask(url, messages=HELLO, max_tokens=5)))
        queued.start()
        _wait(lambda: server.engine.waiting)  # the row is taken: the second request waits, the queue is full
        refused = _ask(url, messages=HELLO, max_tokens=5)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    # The first stream was closed mid-reply: its request is cancelled, and its row goes to the queued one.
    gate.release(10_000)
    queued.join(timeout=60)
    assert results and results[0].status_code == 200
    _wait(lambda: server.engine.busy == 0)
    assert httpx.get(url + "/health").json()["ended"]["cancelled"] == 1


class _Clock:
    """time.monotonic as the server module sees it, moved forward by the test at will."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead_s


def test_a_request_past_its_timeout_gets_504_and_frees_its_row(tokenizer_module: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No race with the decode speed: the engine holds after admitting the request, and the server's clock
    is moved past the deadline by the test, so the reply can neither finish first nor time out early."""
    import types

    from persona_axis.apps import server_http as server_module

    clock = _Clock()
    monkeypatch.setattr(server_module, "time", types.SimpleNamespace(monotonic=clock.monotonic, time=time.time,
                                                                     sleep=time.sleep))
    with running_server(tokenizer_module, ServerLimits(timeout_s=60.0)) as (url, server):
        gate, step = threading.Semaphore(0), server.engine.step
        server.engine.step = lambda: (gate.acquire(), step())[1]  # the engine steps only when the test lets it
        results: list[httpx.Response] = []
        asking = threading.Thread(target=lambda: results.append(
            _ask(url, messages=HELLO, max_tokens=450, persona_axis={"ignore_eos": True})))
        asking.start()
        try:
            _wait(lambda: server.engine.waiting)
            gate.release(1)  # one step: the request takes a row and decodes one token, then the engine holds
            _wait(lambda: server.engine.busy == 1 and not server.engine.waiting)
            clock.ahead_s = 61.0  # past the deadline; the handler notices within its 0.5 s poll
            asking.join(timeout=30)
        finally:
            gate.release(10_000)
        assert results, "no answer after the deadline passed"
        response = results[0]
        assert response.status_code == 504 and "timeout" in response.json()["error"]["message"]
        _wait(lambda: server.engine.busy == 0)  # the cancelled request's row is freed at the next step
        assert httpx.get(url + "/health").json()["ended"]["cancelled"] == 1


def test_our_judge_and_user_simulator_clients_work_against_it(served: tuple[str, Any]) -> None:
    url, _ = served
    judge = OpenAIJudge(url + "/v1", "persona-axis", concurrency=2, max_attempts=1)
    verdicts = judge.score([JudgeItem("pirate", "a sea robber", "Who are you?", "Arr, a pirate.")] * 2)
    assert len(verdicts) == 2 and all(v.judge == "openai:persona-axis" for v in verdicts)
    assert all(v.score is not None or "unscored" in v.rationale for v in verdicts)
    simulator = OpenAIUserSimulator(url + "/v1", "persona-axis", max_attempts=2)
    persona = DomainPersona("dev-1", "coding", "You are a developer.", "Python", "Hi")
    messages = simulator.next_messages([persona], [[{"role": "user", "content": "Hi"}]])
    assert len(messages) == 1 and messages[0].strip()


def _wait(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
