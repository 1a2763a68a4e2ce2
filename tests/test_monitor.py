from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model

from persona_axis.axis import Axis
from persona_axis.control.monitor import (
    ConversationProjector,
    LiveAlert,
    generate_with_alerts,
    plot_trajectory,
    project_by_prefix,
    project_conversation,
    project_windowed,
    turn_layout,
)
from persona_axis.conversations import read_conversations
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, wrap_model

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "Arr, I be a pirate!"},
    {"role": "user", "content": "Really?"},
    {"role": "assistant", "content": "Aye. The sea is my home."},
    {"role": "user", "content": "Tell me more."},
    {"role": "assistant", "content": "Nothing more to tell, matey."},
]


@pytest.fixture()
def axis() -> Axis:
    return Axis(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("system_role", [True, False])  # False: the system text is folded into the first user turn
def test_one_pass_equals_a_forward_pass_per_prefix(tiny_llama: LoadedModel, axis: Axis, system_role: bool) -> None:
    tiny_llama.system_role = system_role
    result = project_conversation(tiny_llama, axis, CONVERSATION, layers=range(3))
    assert result.layer == 1 and [t.role for t in result.turns] == [m["role"] for m in CONVERSATION]
    for layer in range(3):
        expected = project_by_prefix(tiny_llama, axis, CONVERSATION, layer)
        got = [t.by_layer[layer] for t in result.turns]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-4)
    assert [t.projection for t in result.turns] == [t.by_layer[1] for t in result.turns]

    live = ConversationProjector(tiny_llama, axis, layers=range(3))  # a live chat: one turn at a time
    for message, turn in zip(CONVERSATION, result.turns):
        added = live.add_turn(message)
        assert added.n_tokens == turn.n_tokens
        assert added.by_layer == pytest.approx(turn.by_layer, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])  # learned positions; sliding-window cache layers
def test_one_pass_equals_prefix_passes_in_other_families(family: str, tokenizer: Any, axis: Axis) -> None:
    lm = wrap_model(tiny_model(family), tokenizer)
    got = [t.projection for t in project_conversation(lm, axis, CONVERSATION, layer=2).turns]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(project_by_prefix(lm, axis, CONVERSATION, 2)),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_system", [True, False])
def test_turn_tokens_are_exactly_the_message_contents(tiny_llama: LoadedModel, axis: Axis, with_system: bool) -> None:
    conversation = CONVERSATION if with_system else CONVERSATION[1:]
    tok = tiny_llama.tokenizer
    layout = turn_layout(tiny_llama, conversation)
    result = project_conversation(tiny_llama, axis, conversation, layer=2)
    assert [t.n_tokens for t in result.turns] == [last - first for first, last in layout.spans]
    assert [tok.decode(layout.ids[a:b]) for a, b in layout.spans] == [m["content"] for m in conversation]
    # Outside every turn: headers, end-of-turn markers, and (without a system message) the default system prompt.
    template_only = tok.apply_chat_template([{**m, "content": ""} for m in conversation], tokenize=False)
    outside = len(tok(template_only, add_special_tokens=False).input_ids)
    assert outside > 5 * len(conversation) + (0 if with_system else 10)
    assert sum(t.n_tokens for t in result.turns) == len(layout.ids) - outside


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_llama: LoadedModel, axis: Axis) -> None:
    tiny_llama.tokenizer.chat_template = (  # the message count up front changes with every message
        "{{ messages | length }}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(PersonaAxisError, match="not prefix-stable"):
        project_conversation(tiny_llama, axis, CONVERSATION)


def test_context_overflow_is_an_error_not_a_truncation(tiny_llama: LoadedModel, axis: Axis) -> None:
    n_tokens = len(turn_layout(tiny_llama, CONVERSATION).ids)
    tiny_llama.model.config.max_position_embeddings = 20
    with pytest.raises(PersonaAxisError, match=f"is {n_tokens} tokens, more than the 20-token context"):
        project_conversation(tiny_llama, axis, CONVERSATION)
    with pytest.raises(PersonaAxisError, match="tokens, more than the 20-token context"):
        project_by_prefix(tiny_llama, axis, CONVERSATION, layer=1)


def _write(path: Path, data: object, jsonl: bool = False) -> Path:
    path.write_text("\n".join(json.dumps(d) for d in data) + "\n\n" if jsonl else json.dumps(data))
    return path


def test_every_accepted_file_form_parses(tmp_path: Path) -> None:
    short = CONVERSATION[1:3]
    assert read_conversations(_write(tmp_path / "a.json", short))[0].messages == short
    [with_meta] = read_conversations(_write(tmp_path / "b.json", {"conversation": short, "id": 7, "domain": "x"}))
    assert with_meta.messages == short and with_meta.metadata == {"id": 7, "domain": "x"}
    lines = read_conversations(_write(tmp_path / "c.jsonl", [short, {"messages": CONVERSATION, "id": 2}], jsonl=True))
    assert [c.messages for c in lines] == [short, CONVERSATION] and lines[1].metadata == {"id": 2}
    assert lines[1].source.endswith("c.jsonl line 2")
    many = read_conversations(_write(tmp_path / "d.json", [{"messages": short}, {"conversation": CONVERSATION}]))
    assert [c.messages for c in many] == [short, CONVERSATION]


BOT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "bot", "content": "c"}]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("conv.json", json.dumps(BOT), "conv.json: message 3: role must be system, user or assistant, not 'bot'"),
    ("conv.jsonl", json.dumps(BOT[:2]) + "\n{oops\n", "conv.jsonl line 2: not JSON (Expecting property name"),
    ("conv.json", json.dumps([BOT[0], {"role": "assistant", "content": " "}]), "conv.json: message 2: empty content"),
    ("conv.json", json.dumps([*BOT[:2], {"role": "system", "content": "s"}]),
     "conv.json: a system message may only come first"),
    ("conv.json", json.dumps({"messages": BOT[:1]}), "conv.json: no assistant turn to project"),
    ("conv.json", json.dumps([{"messages": BOT[:2]}, {"messages": [{"role": "user", "content": 3}]}]),
     "conv.json: conversation 2: message 1: content must be a string"),
    ("conv.json", json.dumps({"turns": BOT[:2]}), "conv.json: expected the messages under exactly one of"),
    ("conv.json", "", "conv.json: not JSON (Expecting value"),
])
def test_malformed_files_name_the_file_and_position(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(PersonaAxisError) as caught:
        read_conversations(tmp_path / name)
    assert f"{tmp_path}/{message}" in str(caught.value) and "\n" not in str(caught.value)


def test_plot_writes_a_png(tiny_llama: LoadedModel, axis: Axis, tmp_path: Path) -> None:
    results = [project_conversation(tiny_llama, axis, c) for c in (CONVERSATION, CONVERSATION[1:5])]
    path = plot_trajectory(results, tmp_path / "drift.png", threshold=0.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_live_alert_fires_once_when_the_running_mean_drops() -> None:
    alert = LiveAlert(threshold=0.0, min_tokens=2)
    fired = [alert.update(v) for v in [-1.0, 3.0, -1.0, -2.0, -5.0, -5.0]]
    assert fired == [False, False, False, True, False, False]  # -1 alone is below, but before min_tokens
    assert alert.running_mean == pytest.approx(-11 / 6)
    alert.reset()
    assert alert.running_mean == 0.0 and [alert.update(v) for v in (-1.0, -1.0)] == [False, True]


def test_generate_with_alerts_reports_where_the_alert_fired(tiny_llama: LoadedModel, axis: Axis) -> None:
    conversations = [CONVERSATION[:2], CONVERSATION[1:4]]
    kwargs = dict(max_new_tokens=6, capture=False, min_tokens=3)
    result, fired = generate_with_alerts(tiny_llama, axis, conversations, 1, threshold=1e6, **kwargs)
    assert result.projections is not None and all(len(p) >= 3 for p in result.projections)
    assert fired == [2, 2] and max(max(p) for p in result.projections) < 1e6
    _, never = generate_with_alerts(tiny_llama, axis, conversations, 1, threshold=-1e6, **kwargs)
    assert never == [None, None]

    values = result.projections[0]
    means = [sum(values[: k + 1]) / (k + 1) for k in range(len(values))]
    threshold = sorted(means[2:])[len(means[2:]) // 2]  # a threshold some later running mean falls below
    _, middle = generate_with_alerts(tiny_llama, axis, conversations[:1], 1, threshold=threshold, **kwargs)
    assert middle == [next(k for k in range(2, len(means)) if means[k] < threshold)]


def test_a_window_projects_long_transcripts_as_the_server_would_see_them(tiny_llama: LoadedModel, axis: Axis) -> None:
    """--window N: each turn is projected in the latest whole messages that fit in N tokens (system kept),
    which equals projecting exactly that window; a transcript that fits is projected as without a window."""
    long = [{"role": "system", "content": "You are terse."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "many words here " * 12}
        for i in range(40)]
    with pytest.raises(PersonaAxisError, match="more than the 512-token context"):
        project_conversation(tiny_llama, axis, long)
    windowed = project_windowed(tiny_llama, axis, long, window=300)
    assert [t.index for t in windowed.turns] == list(range(len(long)))
    assert windowed.turns[1].dropped == 0 and windowed.turns[-1].dropped > 0
    for k in (5, 22, len(long) - 1):
        turn = windowed.turns[k]
        window = [long[0], *long[1 + turn.dropped : k + 1]]
        alone = project_conversation(tiny_llama, axis, window)
        assert turn.projection == pytest.approx(alone.turns[-1].projection, abs=1e-5)
    short = project_windowed(tiny_llama, axis, long[:4], window=10_000)
    assert [t.projection for t in short.turns] == pytest.approx(
        [t.projection for t in project_conversation(tiny_llama, axis, long[:4]).turns], abs=1e-6)
