"""The serving engine: a request answered inside a mixed batch (other rows capped, steered or plain, joining
and leaving at other times) gets exactly what it gets alone, and alone it matches offline `generate`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.engine import EndEvent, Engine, QueueFull, Sampling, TokenEvent, run_to_end
from persona_axis.generation import generate
from persona_axis.models import LoadedModel, wrap_model
from persona_axis.row_interventions import RowSettings
from persona_axis.steering import Addition, Cap

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
    caps = {layer: (units[layer], 0.5) for layer in (1, 2)} if kind in ("cap", "both") else {}
    additions = {1: -3.0 * units[1]} if kind in ("steer", "both") else {}
    return RowSettings(caps=caps, additions=additions, watch=(0, units[0]))


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
    [bare] = run_to_end(Engine(lm, max_rows=1), [(job[0], job[1], RowSettings({}, {}, _settings(lm, "x").watch))])
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
        interventions: dict[int, list[Any]] = {}
        for layer, (unit, floor) in settings.caps.items():
            interventions.setdefault(layer, []).append(Cap(unit, floor))
        for layer, vector in settings.additions.items():
            interventions.setdefault(layer, []).append(Addition(vector, 1.0))
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
