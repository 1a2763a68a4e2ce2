"""Chat replies: where they read their projection, and a streamed reply equal to the plain one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from persona_axis.apps.chat import ChatSession, reply_batch, reply_variants
from persona_axis.axis import Axis
from persona_axis.decode.interventions import Addition, Cap
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel

TALK = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Name a colour."}]]


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
