"""The drift guard: a cap held back until the reply's running mean projection falls below a threshold, then on for
the rest of the reply and, in the server, for the conversation's later turns."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import torch
from serving import EXPERIMENT, running_server, tiny_lm

from persona_axis.apps.server import parse_guard
from persona_axis.decode.engine import Engine, run_to_end
from persona_axis.decode.interventions import Cap
from persona_axis.decode.requests import EndEvent, Sampling, TokenEvent
from persona_axis.decode.row_interventions import Guard, RowSettings
from persona_axis.errors import PersonaAxisError

TOKENS = 10
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


def _setup(tokenizer: Any) -> tuple[Any, list[int], tuple[int, torch.Tensor], dict[int, list[Cap]]]:
    lm = tiny_lm(tokenizer)
    torch.manual_seed(7)
    unit = torch.nn.functional.normalize(torch.randn(lm.hidden_size), dim=0)
    ids = lm.tokenizer(lm.chat_prompt(HELLO), add_special_tokens=False).input_ids
    return lm, ids, (0, unit), {1: [Cap(unit, 5.0)], 2: [Cap(unit, 5.0)]}  # a floor the random model sits below


def _events(lm: Any, ids: list[int], settings: RowSettings) -> tuple[list[TokenEvent], EndEvent]:
    events: list[Any] = []
    engine = Engine(lm, max_rows=1)
    engine.submit(ids, Sampling(TOKENS, ignore_eos=True), settings, events.append)
    while not events or not isinstance(events[-1], EndEvent):
        engine.step()
    return events[:-1], events[-1]


def test_a_guard_that_never_fires_leaves_the_reply_as_it_is(tokenizer: Any) -> None:
    lm, ids, watch, caps = _setup(tokenizer)
    [plain] = run_to_end(Engine(lm), [(ids, Sampling(TOKENS, ignore_eos=True), RowSettings(watch=watch))])
    tokens, end = _events(lm, ids, RowSettings(watch=watch, guard=Guard(-math.inf, caps)))
    assert end.token_ids == plain.token_ids and end.guard_fired_at is None and end.engaged == {}
    assert not any(t.guard_fired or t.capped_layers for t in tokens)


def test_a_guard_fires_on_a_low_running_mean_and_caps_the_rest_of_the_reply(tokenizer: Any) -> None:
    lm, ids, watch, caps = _setup(tokenizer)
    [plain] = run_to_end(Engine(lm), [(ids, Sampling(TOKENS, ignore_eos=True), RowSettings(watch=watch))])
    tokens, end = _events(lm, ids, RowSettings(watch=watch, guard=Guard(math.inf, caps, min_tokens=3)))
    assert end.guard_fired_at == 2 and [t.guard_fired for t in tokens].index(True) == 2
    assert end.token_ids[:4] == plain.token_ids[:4]  # the token after the firing was picked before the cap acted
    assert not any(t.capped_layers for t in tokens[:3]) and all(t.capped_layers == (1, 2) for t in tokens[3:])
    assert end.engaged == {1: 1.0, 2: 1.0}  # shares of the tokens after the firing
    assert end.token_ids != plain.token_ids


def test_a_guard_needs_a_watch_and_something_to_turn_on(tokenizer: Any) -> None:
    _, _, watch, caps = _setup(tokenizer)
    with pytest.raises(PersonaAxisError, match="watch"):
        RowSettings(guard=Guard(0.0, caps))
    with pytest.raises(PersonaAxisError, match="interventions"):
        Guard(0.0, {})
    assert parse_guard("-1.5@12").below == -1.5 and parse_guard("3").layer is None
    with pytest.raises(PersonaAxisError, match="BELOW@LAYER"):
        parse_guard("low@x")


def _chat(url: str, messages: list[dict[str, str]], **extension: Any) -> httpx.Response:
    body = {"messages": messages, "max_tokens": TOKENS, "temperature": 0,
            "persona_axis": {"cap": EXPERIMENT, "ignore_eos": True, **extension}}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_the_server_guards_a_reply_and_caps_the_conversations_later_turns(tokenizer: Any) -> None:
    with running_server(tokenizer) as (url, _):
        calm = _chat(url, HELLO, guard={"below": -1e9}).json()["persona_axis"]
        assert calm["guard"] == {"below": -1e9, "from_start": False, "fired_at": None} and calm["cap_engaged"] == {}
        fired = _chat(url, HELLO, guard={"below": 1e9}).json()
        ext = fired["persona_axis"]
        assert ext["guard"]["fired_at"] == 3 and not ext["guard"]["from_start"] and set(ext["cap_engaged"]) == {"1", "2"}
        history = [*HELLO, {"role": "assistant", "content": fired["choices"][0]["message"]["content"]},
                   {"role": "user", "content": "And then?"}]
        later = _chat(url, history, guard={"below": 1e9}).json()["persona_axis"]
        assert later["guard"] == {"below": 1e9, "from_start": True, "fired_at": None}
        assert later["cap_engaged"] == {"1": 1.0, "2": 1.0}  # capped from its first token
        other = [*HELLO, {"role": "assistant", "content": "Something else."}, {"role": "user", "content": "And then?"}]
        assert not _chat(url, other, guard={"below": -1e9}).json()["persona_axis"]["guard"]["from_start"]
        _chat(url, HELLO, guard={"below": 1e9}, conversation="c-1")
        named = _chat(url, other, guard={"below": -1e9}, conversation="c-1").json()["persona_axis"]
        assert named["guard"]["from_start"]  # a client-named conversation is remembered by its name
        for extension, says in (({"guard": {"below": 0}, "projections": None}, "keep them on"),
                                ({"guard": {"under": 0}}, "persona_axis.guard must be"),
                                ({"guard": {"below": 0}, "conversation": 3}, "conversation must be")):
            refused = _chat(url, HELLO, **extension)
            assert refused.status_code == 400 and says in refused.json()["error"]["message"]
        no_cap = httpx.post(url + "/v1/chat/completions", timeout=60,
                            json={"messages": HELLO, "persona_axis": {"guard": {"below": 0}}})
        assert no_cap.status_code == 400 and "name one with persona_axis.cap" in no_cap.json()["error"]["message"]


def test_streamed_chunks_say_when_the_guard_fired(tokenizer: Any) -> None:
    import json

    with running_server(tokenizer) as (url, _):
        body = {"messages": HELLO, "max_tokens": TOKENS, "temperature": 0, "stream": True,
                "persona_axis": {"cap": EXPERIMENT, "ignore_eos": True, "guard": {"below": 1e9, "min_tokens": 2}}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    marks = [c["persona_axis"].get("guard_fired", False) for c in chunks if c.get("persona_axis")
             and "projection" in c["persona_axis"]]
    assert marks.index(True) == 1 and marks.count(True) == 1
    assert chunks[-1]["persona_axis"]["guard"]["fired_at"] == 1
