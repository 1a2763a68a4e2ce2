"""The serving engine: a request answered inside a mixed batch (other rows capped, steered or plain, joining
and leaving at other times) gets exactly what it gets alone, and alone it matches offline `generate`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.decode.engine import SHRINK_AFTER_STEPS, Engine, run_to_end
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Addition, Cap, Intervention
from persona_axis.decode.requests import EndEvent, QueueFull, Sampling, TokenEvent, stop_prefix_length
from persona_axis.decode.row_interventions import RowSettings
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, wrap_model

TOKENS = 8
PROMPTS = [
    [{"role": "user", "content": "Tell me about the lighthouse on the northern cliffs and its keepers. " * 2}],
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You are a hermit."}, {"role": "user", "content": "Your cave?"}],
    [{"role": "user", "content": "Count to ten."}],
    [{"role": "user", "content": "Name a colour, then another, then a third one."}],
]


@pytest.fixture()
def lm(tokenizer: Any) -> LoadedModel:
    return wrap_model(tiny_model("llama"), tokenizer, name="tiny-llama")


def _ids(lm: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    return lm.tokenizer(lm.chat_prompt(messages), add_special_tokens=False).input_ids


def _directions(lm: LoadedModel) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(lm.n_layers, lm.hidden_size), dim=-1)


def _settings(lm: LoadedModel, kind: str) -> RowSettings:
    """Per-row settings: 'cap' floors layers 1-2 high (the cap acts), 'steer' adds at layer 1, 'both', 'plain'."""
    units = _directions(lm)
    interventions: dict[int, list[Intervention]] = {}
    if kind in ("cap", "both"):
        for layer in (1, 2):
            interventions.setdefault(layer, []).append(Cap(units[layer], 0.5))
    if kind in ("steer", "both"):
        interventions.setdefault(1, []).append(Addition(units[1], -3.0))
    return RowSettings(interventions, watch=(0, units[0]))


def _job(lm: LoadedModel, i: int, kind: str, temperature: float = 0.0) -> tuple[list[int], Sampling, RowSettings]:
    return _ids(lm, PROMPTS[i]), Sampling(TOKENS - i % 3, temperature=temperature, seed=i), _settings(lm, kind)


KINDS = ["both", "steer", "cap", "plain", "plain"]  # the plain requests refill slots that held a cap and steering


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_request_in_a_mixed_batch_gets_what_it_gets_alone(lm: LoadedModel, temperature: float) -> None:
    jobs = [_job(lm, i, kind, temperature) for i, kind in enumerate(KINDS)]
    mixed = run_to_end(Engine(lm, max_rows=3), jobs)  # 5 requests through 3 rows: rows are refilled
    for i, job in enumerate(jobs):
        [alone] = run_to_end(Engine(lm, max_rows=1), [job])
        assert mixed[i].token_ids == alone.token_ids and mixed[i].reason == alone.reason
        assert len(mixed[i].projections) == len(mixed[i].token_ids)
        torch.testing.assert_close(torch.tensor(mixed[i].projections), torch.tensor(alone.projections),
                                   atol=1e-5, rtol=1e-5)
        assert mixed[i].engaged == alone.engaged


def test_interventions_act_on_their_own_row_only(lm: LoadedModel) -> None:
    """Same prompt in every row, different settings: capped and steered rows differ from the plain one,
    and the plain row equals the request made with no settings at all (its row is untouched)."""
    job = _job(lm, 3, "plain")
    rows = [(job[0], job[1], _settings(lm, kind)) for kind in ("cap", "plain", "steer")]
    capped, plain, steered = run_to_end(Engine(lm, max_rows=3), rows)
    [bare] = run_to_end(Engine(lm, max_rows=1), [(job[0], job[1], RowSettings(watch=_settings(lm, "x").watch))])
    assert plain.token_ids == bare.token_ids
    torch.testing.assert_close(torch.tensor(plain.projections), torch.tensor(bare.projections), atol=1e-5, rtol=1e-5)
    assert capped.engaged[1] > 0 and plain.engaged == {} and steered.engaged == {}
    assert capped.token_ids != plain.token_ids or capped.projections != plain.projections
    assert steered.token_ids != plain.token_ids or steered.projections != plain.projections


def test_alone_it_matches_offline_generate_with_the_same_interventions(lm: LoadedModel) -> None:
    units = _directions(lm)
    for i, kind in enumerate(["cap", "steer", "plain"]):
        prompt, sampling, settings = _job(lm, i, kind, temperature=0.9)
        [served] = run_to_end(Engine(lm), [(prompt, sampling, settings)])
        interventions = {layer: list(items) for layer, items in settings.interventions.items()}
        offline = generate(lm, [PROMPTS[i]], max_new_tokens=sampling.max_new_tokens, temperature=0.9,
                           seed=sampling.seed, capture=False, interventions=interventions, watch=(0, units[0]))
        assert served.token_ids == offline.token_ids[0] and served.text == offline.texts[0]
        assert offline.projections is not None
        torch.testing.assert_close(torch.tensor(served.projections), torch.tensor(offline.projections[0]),
                                   atol=1e-5, rtol=1e-5)


def test_tokens_stream_with_their_projections_and_cancel_frees_the_row(lm: LoadedModel) -> None:
    engine = Engine(lm, max_rows=1, max_waiting=1)
    events: list[Any] = []
    first = engine.submit(*_job(lm, 0, "cap"), on_event=events.append)
    engine.step()  # the first request takes the only row and is fed its first token
    later: list[Any] = []
    engine.submit(*_job(lm, 1, "plain"), on_event=later.append)
    with pytest.raises(QueueFull):
        engine.submit(*_job(lm, 2, "plain"), on_event=later.append)
    engine.step()
    first.cancel()
    engine.step()  # the cancelled row leaves; the waiting request takes its slot
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(tokens) == 2 and all(t.projection is not None for t in tokens)
    assert [e.reason for e in ends] == ["cancelled"] and ends[0].token_ids == [t.token_id for t in tokens]
    assert engine.busy == 1 and [type(e) for e in later] == [TokenEvent]


def _spanning_stop(lm: LoadedModel, ids: list[int], text: str) -> str:
    """Two characters of `text` around a token boundary (the last of one token, the first of the next) that occur
    first there: the token that begins this stop text is fed before the one that completes it."""
    ends = [len(lm.tokenizer.decode(ids[:j], skip_special_tokens=True)) for j in range(len(ids) + 1)]
    for j in range(1, len(ids) - 1):
        at = ends[j] - 1
        stop = text[at : at + 2]
        if ends[j] > ends[j - 1] and ends[j + 1] > ends[j] and len(stop) == 2 and text.find(stop) == at and at > 0:
            return stop
    raise AssertionError("no stop text spans a token boundary in this reply")


def test_a_stream_never_shows_part_of_a_stop_text(lm: LoadedModel) -> None:
    prompt = _ids(lm, PROMPTS[0])
    [free] = run_to_end(Engine(lm), [(prompt, Sampling(24, ignore_eos=True), RowSettings())])
    stop = _spanning_stop(lm, free.token_ids, free.text)
    events: list[Any] = []
    engine = Engine(lm)
    engine.submit(prompt, Sampling(24, stop_texts=(stop,), ignore_eos=True), RowSettings(), events.append)
    while not events or not isinstance(events[-1], EndEvent):
        engine.step()
    *tokens, end = events
    streamed = "".join(e.text for e in tokens)
    assert end.reason == "stop" and end.text == free.text[: free.text.find(stop)]
    assert end.text.startswith(streamed)  # nothing of the stop text streamed; the server sends the rest at the end


def test_stop_prefix_length() -> None:
    assert stop_prefix_length("the end is ne", ("near", "END")) == 2
    assert stop_prefix_length("the end is n", ("near",)) == 1
    assert stop_prefix_length("the end", ("near",)) == 0 and stop_prefix_length("abc", ()) == 0
    assert stop_prefix_length("xx</s", ("</stop>", "</s>")) == 3


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(lm: LoadedModel) -> None:
    long_prompt = _ids(lm, [{"role": "user", "content": PROMPTS[0][0]["content"] * 3}])
    short_prompt = _ids(lm, PROMPTS[1])
    chunk = len(short_prompt)  # the short prompt fits one chunk, the long one needs several
    steps_needed = -(-len(long_prompt) // chunk)
    assert steps_needed >= 3
    long = (long_prompt, Sampling(TOKENS + steps_needed), _settings(lm, "cap"))  # prefilled under its own caps
    short = (short_prompt, Sampling(TOKENS + steps_needed), _settings(lm, "plain"))
    engine = Engine(lm, max_rows=2, prefill_chunk=chunk)
    short_events: list[Any] = []
    long_events: list[Any] = []
    engine.submit(*short, on_event=short_events.append)
    engine.step()
    engine.submit(*long, on_event=long_events.append)
    for step in range(1, steps_needed + 1):
        engine.step()
        assert len(short_events) == 1 + step  # the short reply gets a token at every step of the long prefill
        assert len(long_events) == (1 if step == steps_needed else 0)  # its first token once the last chunk is in
    while not (short_events and isinstance(short_events[-1], EndEvent) and isinstance(long_events[-1], EndEvent)):
        engine.step()
    [long_alone] = run_to_end(Engine(lm), [long])  # one prefill pass for the whole prompt
    [short_alone] = run_to_end(Engine(lm), [short])
    for ended, alone in ((long_events[-1], long_alone), (short_events[-1], short_alone)):
        assert ended.token_ids == alone.token_ids and ended.engaged == alone.engaged
        torch.testing.assert_close(torch.tensor(ended.projections), torch.tensor(alone.projections),
                                   atol=1e-4, rtol=1e-4)


def _long_prompt(lm: LoadedModel, repeats: int) -> list[int]:
    return _ids(lm, [{"role": "user", "content": PROMPTS[0][0]["content"] * repeats}])


def _until_ended(engine: Engine, *events: list[Any]) -> None:
    while not all(e and isinstance(e[-1], EndEvent) for e in events):
        engine.step()


def test_with_nothing_decoding_long_prompts_are_prefilled_whole_and_together(lm: LoadedModel) -> None:
    engine = Engine(lm, max_rows=3, prefill_chunk=8)
    events: list[list[Any]] = [[], [], []]
    for prompt, got in zip([_long_prompt(lm, 2), _long_prompt(lm, 3), _ids(lm, PROMPTS[1])], events):
        engine.submit(prompt, Sampling(TOKENS), _settings(lm, "plain"), got.append)
    engine.step()
    assert engine.prefilling is None and all(len(got) == 1 for got in events)  # one pass, everyone's first token


def test_requests_arriving_mid_prefill_neither_take_its_slot_nor_shrink_it_away(lm: LoadedModel) -> None:
    long = (_long_prompt(lm, 16), Sampling(TOKENS), _settings(lm, "cap"))
    chunks = -(-len(long[0]) // 40)
    assert chunks > SHRINK_AFTER_STEPS + 2  # a sparse batch would be shrunk during this prefill
    short = (_ids(lm, PROMPTS[1]), Sampling(chunks + TOKENS), _settings(lm, "plain"))
    later = (_ids(lm, PROMPTS[3]), Sampling(TOKENS), _settings(lm, "steer"))
    engine = Engine(lm, max_rows=3, prefill_chunk=40)  # the short prompts fit one chunk
    got: list[list[Any]] = [[], [], []]
    engine.submit(*short, on_event=got[0].append)
    engine.step()
    engine.submit(*long, on_event=got[1].append)
    for _ in range(SHRINK_AFTER_STEPS + 1):  # one row decoding, one reserved: a sparse batch, left as it is
        engine.step()
    assert engine.prefilling is not None
    assert max(len(short[0]), len(later[0])) <= 40 < len(long[0])
    engine.submit(*later, on_event=got[2].append)  # takes a new row, not the reserved one
    _until_ended(engine, *got)
    for job, events in zip((short, long, later), got):
        [alone] = run_to_end(Engine(lm), [job])
        assert events[-1].reason == alone.reason and events[-1].token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(events[-1].projections), torch.tensor(alone.projections),
                                   atol=1e-4, rtol=1e-4)


def test_cancelling_a_prompt_mid_prefill_frees_its_slot(lm: LoadedModel) -> None:
    engine = Engine(lm, max_rows=2, prefill_chunk=8)
    short: list[Any] = []
    events: list[Any] = []
    engine.submit(_ids(lm, PROMPTS[1]), Sampling(3 * TOKENS), _settings(lm, "plain"), short.append)
    engine.step()
    request = engine.submit(*_job(lm, 0, "plain"), on_event=events.append)
    engine.step()
    assert engine.prefilling is not None and not events
    request.cancel()
    engine.step()
    assert engine.prefilling is None and [e.reason for e in events] == ["cancelled"]
    again: list[Any] = []
    engine.submit(*_job(lm, 2, "plain"), on_event=again.append)  # takes the freed slot
    _until_ended(engine, short, again)
    assert again[-1].reason in ("stop", "length")
    with pytest.raises(PersonaAxisError, match="prefill chunk of at least one token"):
        Engine(lm, prefill_chunk=0)


def test_closing_ends_running_and_half_prefilled_requests_as_cancelled(lm: LoadedModel) -> None:
    engine = Engine(lm, max_rows=2, prefill_chunk=8)
    running: list[Any] = []
    prefilling: list[Any] = []
    engine.submit(_ids(lm, PROMPTS[1]), Sampling(50), _settings(lm, "plain"), running.append)
    engine.step()
    engine.submit(*_job(lm, 0, "plain"), on_event=prefilling.append)
    engine.step()
    assert engine.prefilling is not None and engine.busy == 1
    engine.close()
    engine.run_forever()  # sees the close at once and ends what it holds, in its own thread
    assert running[-1].reason == "cancelled" and prefilling[-1].reason == "cancelled"
    assert engine.busy == 0 and engine.prefilling is None


def test_a_conversations_next_turn_reuses_the_finished_turns_keys_and_values(lm: LoadedModel) -> None:
    """The serving engine keeps a finished reply's prompt and reply as a prefix: the next turn, whose prompt begins
    with them, prefills only its new message, and gets the reply a fresh engine gives it. A reply generated under a
    'reply'-position intervention is not kept (its keys/values differ from a prefill of the same tokens)."""
    first = [{"role": "user", "content": "Tell me a long story about the lighthouse keepers of the north. " * 3}]
    units = _directions(lm)
    for settings, kept in ((RowSettings(), True), (RowSettings({1: [Cap(units[1], 0.5)]}), True),
                           (RowSettings({1: [Addition(units[1], -3.0, positions="reply")]}), False)):
        engine = Engine(lm, max_rows=2)
        [turn] = run_to_end(engine, [(_ids(lm, first), Sampling(TOKENS, ignore_eos=True), settings)])
        prompt = _ids(lm, first) + turn.token_ids + _ids(lm, [{"role": "user", "content": "And then?"}])
        prefixes = engine.runner.prefixes
        assert prefixes is not None and len(prefixes.entries) == int(kept)
        [reused] = run_to_end(engine, [(prompt, Sampling(TOKENS), settings)])
        assert prefixes.hits == int(kept)
        [fresh] = run_to_end(Engine(lm, max_rows=2, share_prefixes=False), [(prompt, Sampling(TOKENS), settings)])
        assert reused.token_ids == fresh.token_ids


def test_an_offline_list_that_captures_gets_each_replys_means_in_its_end_event(lm: LoadedModel) -> None:
    """Capture in the engine: a reply's means equal a plain forward's over its reply tokens, in any batch."""
    assert lm.n_layers > 2  # layer 1's output is a plain hidden state (the last one is normed)
    engine = Engine(lm, max_rows=3, capture_layers=[0, 1])
    prompts = [_ids(lm, p) for p in PROMPTS]
    ends: dict[int, EndEvent] = {}
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, Sampling(TOKENS, ignore_eos=True), RowSettings(),
                      lambda e, i=i: ends.__setitem__(i, e) if isinstance(e, EndEvent) else None, capture=True)
    while len(ends) < len(prompts):
        engine.step()
    for i, end in ends.items():
        assert end.means is not None and end.means.shape == (2, lm.hidden_size)
        prompt = prompts[i]
        with torch.no_grad():
            states = lm.model(input_ids=torch.tensor([prompt + end.token_ids]), output_hidden_states=True).hidden_states
        for k, layer in enumerate((0, 1)):
            expected = states[layer + 1][0, len(prompt):].mean(0)
            torch.testing.assert_close(end.means[k], expected, atol=1e-4, rtol=1e-4)
