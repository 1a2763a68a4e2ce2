"""Steering specs and their scale, options → interventions, and where chat replies read their projection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_capping import make_run

from persona_axis.axis import Axis, save_axis
from persona_axis.calibration import calibrate
from persona_axis.capping import save_config
from persona_axis.chat import (
    ChatSession,
    SteerSpec,
    build_interventions,
    default_norms,
    describe_interventions,
    load_interventions,
    parse_steer,
    reply_batch,
    reply_variants,
)
from persona_axis.errors import PersonaAxisError
from persona_axis.models import LoadedModel
from persona_axis.steering import Addition, Cap

TALK = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Name a colour."}]]


def test_parse_steer_accepts_axis_and_norm_units() -> None:
    assert parse_steer("-2@15") == SteerSpec(-2.0, 15, relative=False)
    assert parse_steer(" +0.5 @ 3 ") == SteerSpec(0.5, 3, relative=False)
    assert parse_steer("-0.5n@15") == SteerSpec(-0.5, 15, relative=True)
    assert parse_steer("1e-1n@0") == SteerSpec(0.1, 0, relative=True)
    for bad in ("-2", "@3", "2@", "x@3", "2@-1", "2x@3", "2nn@3", "2@1.5", "n@3"):
        with pytest.raises(PersonaAxisError, match="COEF@LAYER.*COEFn@LAYER"):
            parse_steer(bad)


def test_relative_steering_is_scaled_by_the_default_activation_norm(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    axis = make_run(tmp_path, layers=3, hidden=64)
    norms = default_norms(tmp_path)
    default = torch.load(tmp_path / "expected_means.pt", weights_only=True)[:3].mean(0)  # the run's default rows
    torch.testing.assert_close(norms, default.norm(dim=-1))
    interventions = build_interventions(tiny_llama, axis, steer=["-0.5n@1", "2@2"], norms=norms)
    [relative], [plain] = interventions[1], interventions[2]
    assert isinstance(relative, Addition) and isinstance(plain, Addition)
    moved = relative.coef * relative.vector  # what the addition adds to every activation at layer 1
    assert float(moved.norm()) == pytest.approx(0.5 * float(norms[1]), rel=1e-5)
    assert float(moved @ axis.unit(1)) == pytest.approx(-0.5 * float(norms[1]), rel=1e-5)  # away from the Assistant
    torch.testing.assert_close(plain.coef * plain.vector, 2 * axis.vectors[2])  # axis units: the raw axis
    with pytest.raises(PersonaAxisError, match="relative to activation norms: give --axis as a run directory"):
        build_interventions(tiny_llama, axis, steer=["-0.5n@1"])
    with pytest.raises(PersonaAxisError, match="--steer layer 3 is out of range"):
        build_interventions(tiny_llama, axis, steer=["1@3"])
    with pytest.raises(PersonaAxisError, match="vectors.safetensors not found"):
        default_norms(tmp_path / "nowhere")


def test_options_give_one_rule_for_config_cap_and_relative_steering(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    run = tmp_path / "run"
    axis = make_run(run, layers=3, hidden=64)
    save_config(calibrate(run, [range(1, 3)], [0.5]), run / "capping")
    with pytest.raises(PersonaAxisError, match="--config is only used with --cap"):
        load_interventions(tiny_llama, axis, run, config=run / "capping")
    capped = load_interventions(tiny_llama, axis, run, cap="layers_1:3-p0.5", steer=["1n@0"])
    assert sorted(capped) == [0, 1, 2] and describe_interventions(capped) == "capped+steered"
    assert isinstance(capped[1][0], Cap) and isinstance(capped[0][0], Addition)
    bare = tmp_path / "axis.safetensors"
    save_axis(axis, bare)
    assert describe_interventions(load_interventions(tiny_llama, axis, bare, steer=["1@0"])) == "steered"
    with pytest.raises(PersonaAxisError, match="give --axis as a run directory"):
        load_interventions(tiny_llama, axis, bare, steer=["1n@0"])
    assert describe_interventions({}) == "plain"


def test_replies_never_report_an_intervened_layer(tiny_llama: LoadedModel) -> None:
    torch.manual_seed(0)
    axis = Axis(torch.randn(3, 64))
    interventions = {1: [Addition(axis.vectors[1], 5.0)], 2: [Cap(axis.vectors[2], 0.0)]}
    replies = reply_batch(tiny_llama, axis, TALK, interventions, max_new_tokens=3)
    for reply in replies:
        assert reply.layer == 0 and reply.projection == reply.projections[0]  # middle layer 1 is steered
        assert reply.projections[1] is None and reply.projections[2] is None
    layer, variants = reply_variants(tiny_llama, axis, TALK, interventions, compare=True, max_new_tokens=3)
    assert layer == 0 and list(variants) == ["plain", "capped+steered"]
    assert all(None not in r.projections for r in variants["plain"])  # nothing intervened on the plain replies
    with pytest.raises(PersonaAxisError, match="--layer 2 is intervened on"):
        reply_variants(tiny_llama, axis, TALK, interventions, layer=2, max_new_tokens=3)
    with pytest.raises(PersonaAxisError, match="--layer -1 is out of range"):
        ChatSession(tiny_llama, axis, {}, layer=-1)
    session = ChatSession(tiny_llama, axis, {0: [Addition(axis.vectors[0], 1.0)]}, max_new_tokens=3)
    assert session.layer == 1 and session.say("Hello").layer == 1  # the middle layer, downstream of layer 0


def test_a_streamed_reply_is_the_reply_say_gives_token_by_token(tiny_llama: LoadedModel) -> None:
    """ChatSession.stream (the server's engine) and .say (offline generate) agree: text, projection, engagement."""
    torch.manual_seed(0)
    axis = Axis(torch.randn(3, 64))
    interventions = {2: [Cap(axis.vectors[2], 0.5, track=True)], 1: [Addition(axis.vectors[1], -1.0)]}
    said = ChatSession(tiny_llama, axis, interventions, max_new_tokens=6).say("Hello?")
    tokens: list[Any] = []
    streamed = ChatSession(tiny_llama, axis, interventions, max_new_tokens=6).stream("Hello?", tokens.append)
    assert "".join(t.text for t in tokens) == streamed.text == said.text and len(tokens) == streamed.n_tokens
    assert streamed.layer == said.layer and streamed.projection == pytest.approx(said.projection, abs=1e-5)
    assert streamed.engaged == pytest.approx(said.engaged) and streamed.engaged[2] > 0
    assert all(t.capped_layers == (2,) for t in tokens if t.capped_layers)
