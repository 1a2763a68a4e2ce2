"""Simulated drift conversations on the tiny random Llama, statistics, the drift predictor and the CLI."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from chat_server import FakeServer, Reply
from scipy.stats import t

from persona_axis.apps import drift_predictor, user_simulators
from persona_axis.apps import simulate as simulate_module
from persona_axis.apps.drift_predictor import drift_dataset, fit_drift_predictor, group_folds
from persona_axis.apps.drift_stats import lowest_turns, plot_domains, turn_statistics
from persona_axis.apps.simulate import conversation_plan, load_simulations, simulate
from persona_axis.apps.user_simulators import (
    DomainPersona,
    LocalUserSimulator,
    OpenAIUserSimulator,
    UserSpec,
    load_domains,
)
from persona_axis.axis import Axis, save_axis
from persona_axis.cli import main
from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Addition, Cap
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, Message
from persona_axis.store import RunStore

TOKENS = 5  # reply length for the target and the local simulator: keeps the tiny model fast


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model is far faster on one thread when the CPU is shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def axis() -> Axis:
    return Axis(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)))


class ScriptedUser:
    """A simulator that answers "user message <turn>" and raises KeyboardInterrupt on call number `stop_at`."""

    id = "scripted"

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]],
                      seeds: Sequence[int] | None = None) -> list[str]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return [f"user message {len(h) // 2 + 1} for {p.id}" for p, h in zip(personas, histories)]


class StoppingUser:
    """A LocalUserSimulator (sampling) that raises KeyboardInterrupt on its call number `stop_at`."""

    def __init__(self, lm: LoadedModel, stop_at: int | None = None) -> None:
        self.inner = LocalUserSimulator(lm, max_new_tokens=TOKENS, temperature=0.9, seed=3)
        self.id, self.calls, self.stop_at = self.inner.id, 0, stop_at

    def next_messages(self, personas: list[DomainPersona], histories: list[list[Message]],
                      seeds: Sequence[int] | None = None) -> list[str]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner.next_messages(personas, histories, seeds=seeds)


class FakeEmbedder:
    """Fixed random vectors [dim] per text (seeded by the text's hash), like SentenceTransformer.encode."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        seeds = [int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) for text in texts]
        return np.stack([np.random.default_rng(seed).standard_normal(self.dim) for seed in seeds])


def counting_generate(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace generate, for the target and the local simulator, with a wrapper recording each call's `capture`."""
    calls: list[Any] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("capture"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(simulate_module, "generate", wrapped)
    monkeypatch.setattr(user_simulators, "generate", wrapped)
    return calls


def synthetic_records(n: int, turns: int, project: Any) -> list[dict[str, Any]]:
    """n conversations whose reply projections are project(user message)."""
    records = []
    for c in range(n):
        messages, projections = [], []
        for k in range(turns):
            user = f"conversation {c} message {k}"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f"reply {c}.{k}"}]
            projections.append(project(user))
        records.append({"id": f"d-{c}", "domain": "d", "persona_id": "d-01", "capped": False, "layer": 1,
                        "messages": messages, "projections": projections})
    return records


def test_domain_catalogue_has_ten_personas_per_domain() -> None:
    domains = load_domains()
    assert list(domains) == ["coding", "writing", "therapy", "philosophy"]
    for name, personas in domains.items():
        assert [p.id for p in personas] == [f"{name}-{k:02d}" for k in range(1, 11)]
        assert all(p.domain == name and p.persona.startswith("You ") and p.topic and p.opening for p in personas)
    assert list(load_domains("therapy")) == ["therapy"]
    with pytest.raises(PersonaAxisError, match="coding, writing, therapy, philosophy"):
        load_domains("cooking")
    plan = conversation_plan("all", 12)
    assert len(plan) == 48 and plan[10] == ("coding-c0010", domains["coding"][0])  # personas cycle


def test_simulate_projections_match_a_separate_capture(tiny_llama: LoadedModel, axis: Axis,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_generate(monkeypatch)
    simulator = LocalUserSimulator(tiny_llama, max_new_tokens=TOKENS)
    records = simulate(tiny_llama, axis, simulator, "therapy", turns=3, n=2, max_new_tokens=TOKENS)
    assert calls == [[1], False, [1], False, [1]]  # one batched call per turn for each side
    assert [r["id"] for r in records] == ["therapy-c0000", "therapy-c0001"]
    for record, persona in zip(records, load_domains("therapy")["therapy"]):
        assert (record["persona_id"], record["capped"], record["layer"]) == (persona.id, False, 1)
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert messages[0]["content"] == persona.opening and len(record["projections"]) == 3
        for k, projection in enumerate(record["projections"]):
            alone = generate(tiny_llama, [messages[:2 * k + 1]], max_new_tokens=TOKENS, capture=[1])
            assert alone.texts[0] == messages[2 * k + 1]["content"]
            assert alone.means is not None
            assert projection == pytest.approx(axis.project(alone.means[0, 0], 1).item(), abs=1e-4)
            prompt = tiny_llama.tokenizer(tiny_llama.chat_prompt(messages[:2 * k + 1]), add_special_tokens=False)
            forward = response_means_by_forward(tiny_llama, [prompt.input_ids], alone.token_ids, [1])  # second pass
            assert projection == pytest.approx(axis.project(forward[0, 0], 1).item(), abs=1e-4)


def _ids(path: Path) -> list[tuple[str, int | None]]:
    return [(r["id"], r.get("turn")) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


@pytest.mark.parametrize("stop_at, left", [
    (2, [2, 5]),  # stopped at the first batch's third turn: its third turn, then the whole second batch
    (3, [4]),  # stopped at the second batch's second turn: the first batch is done, the second has turn 1
])
def test_resume_continues_conversations_mid_way(tiny_llama: LoadedModel, axis: Axis, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, stop_at: int,
                                                left: list[int]) -> None:
    """Both sides sample; interrupted inside a batch, then resumed: equal to an uninterrupted run."""
    options: dict[str, Any] = {"domain": "coding", "turns": 3, "n": 3, "max_new_tokens": TOKENS, "batch_size": 2,
                               "temperature": 0.9, "seed": 5}
    whole = simulate(tiny_llama, axis, StoppingUser(tiny_llama), **options)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        simulate(tiny_llama, axis, StoppingUser(tiny_llama, stop_at=stop_at), out=out, **options)
    finished, turns = out / "conversations.jsonl", out / "turns.jsonl"
    if stop_at == 2:
        assert _ids(finished) == [] and _ids(turns) == [("coding-c0000", 1), ("coding-c0001", 1),
                                                        ("coding-c0000", 2), ("coding-c0001", 2)]
        with pytest.raises(PersonaAxisError, match="no finished conversation yet .2 half-way"):
            load_simulations([out])
    else:
        assert _ids(finished) == [("coding-c0000", None), ("coding-c0001", None)]
        assert _ids(turns)[-1] == ("coding-c0002", 1)
    [half] = [r for r in load_simulations([out], unfinished=True) if not r["finished"]][-1:]
    assert len(half["projections"]) == len(half["messages"]) // 2 == 3 - stop_at + 1
    calls = counting_generate(monkeypatch)
    resumed = simulate(tiny_llama, axis, StoppingUser(tiny_llama), out=out, **options)
    assert len(calls) == sum(left)  # one call per side and turn, for the turns left only
    assert resumed == whole
    assert [r["id"] for r in load_simulations([out])] == [r["id"] for r in whole]
    assert all(r["finished"] for r in load_simulations([out], unfinished=True))
    before = finished.read_bytes(), turns.read_bytes()
    assert simulate(tiny_llama, axis, StoppingUser(tiny_llama), out=out, **options) == whole
    assert len(calls) == sum(left) and (finished.read_bytes(), turns.read_bytes()) == before


def test_a_batch_torn_mid_turn_regenerates_that_turn_whole(tiny_llama: LoadedModel, axis: Axis,
                                                           tmp_path: Path) -> None:
    """A crash inside the append of a turn leaves some conversations of the batch with it and some without:
    the batch redoes that turn for all (same companions as uninterrupted) and appends only the missing."""
    options: dict[str, Any] = {"domain": "therapy", "turns": 3, "n": 3, "max_new_tokens": TOKENS,
                               "batch_size": 3, "temperature": 0.9}
    out = tmp_path / "run"
    whole = simulate(tiny_llama, axis, StoppingUser(tiny_llama), out=out, **options)
    turns, finished = out / "turns.jsonl", out / "conversations.jsonl"
    assert [turn for _, turn in _ids(turns)] == [1, 1, 1, 2, 2, 2]
    lines = finished.read_text().splitlines()
    finished.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # torn inside the second record
    turns.write_text("".join(line + "\n" for line in turns.read_text().splitlines()[:5]))  # c2 lacks turn 2
    # Now c0 has 3 turns, c1 2 and c2 1: the batch goes on at turn 2, for all three.
    assert simulate(tiny_llama, axis, StoppingUser(tiny_llama), out=out, **options) == whole
    assert _ids(turns)[5:] == [("therapy-c0002", 2)]
    assert [r["id"] for r in RunStore(out).records("conversations")] == [r["id"] for r in whole]


def test_a_directory_of_the_earlier_format_is_read_but_not_resumed(tiny_llama: LoadedModel, axis: Axis,
                                                                   tmp_path: Path) -> None:
    records = synthetic_records(2, 2, lambda text: 1.0)
    with RunStore.open(tmp_path) as store:
        store.claim({"kind": "drift-simulation", "domain": "d", "turns": 2}, {})
        store.append("conversations", records)
    assert [r["id"] for r in load_simulations([tmp_path])] == ["d-0", "d-1"]
    with pytest.raises(PersonaAxisError, match="earlier persona-axis .format 1, this one writes 2"):
        simulate(tiny_llama, axis, ScriptedUser(), "writing", 2, 1, max_new_tokens=TOKENS, out=tmp_path)


def test_other_settings_on_the_same_directory_are_refused(tiny_llama: LoadedModel, axis: Axis,
                                                          tmp_path: Path) -> None:
    options: dict[str, Any] = {"domain": "writing", "n": 1, "max_new_tokens": TOKENS, "out": tmp_path}
    simulate(tiny_llama, axis, ScriptedUser(), turns=1, **options)
    with pytest.raises(PersonaAxisError, match="different settings.*turns"):
        simulate(tiny_llama, axis, ScriptedUser(), turns=2, **options)
    cap = {1: Cap(axis.vectors[1], floor=5.0)}
    with pytest.raises(PersonaAxisError, match="different settings.*capping"):
        simulate(tiny_llama, axis, ScriptedUser(), turns=1, interventions=cap, **options)
    [capped] = simulate(tiny_llama, axis, ScriptedUser(), turns=2, interventions=cap, **{**options, "out": None})
    assert capped["capped"] and capped["layer"] == 0  # the middle layer 1 is capped: read just below it
    assert max(capped["projections"]) < 5.0  # not the floor the cap imposes at layer 1


def test_simulate_never_records_an_intervened_layer(tiny_llama: LoadedModel, axis: Axis) -> None:
    options: dict[str, Any] = {"domain": "writing", "n": 1, "turns": 1, "max_new_tokens": TOKENS}
    steered = {0: Addition(axis.vectors[0], 3.0)}
    [record] = simulate(tiny_llama, axis, ScriptedUser(), interventions=steered, **options)
    assert record["layer"] == 1  # steering at layer 0 leaves no layer below it: read just above
    every_but_2 = {0: Addition(axis.vectors[0], 3.0), 1: Cap(axis.vectors[1], floor=5.0)}
    assert simulate(tiny_llama, axis, ScriptedUser(), interventions=every_but_2, **options)[0]["layer"] == 2
    with pytest.raises(PersonaAxisError, match="--layer 1 is intervened on"):
        simulate(tiny_llama, axis, ScriptedUser(), layer=1, interventions=every_but_2, **options)
    with pytest.raises(PersonaAxisError, match="--layer -1 is out of range"):
        simulate(tiny_llama, axis, ScriptedUser(), layer=-1, **options)


def test_turn_statistics_intervals_and_plot(tmp_path: Path) -> None:
    records = synthetic_records(3, 2, lambda text: float(text.split()[1]) + float(text.split()[-1]))
    records.append({**records[0], "id": "d-capped", "capped": True, "projections": [7.0, None]})
    for k, projections in enumerate([[None, 1.0], [2.0, 3.0]]):  # a gap first: turn 2 is seen before turn 1
        records.append({**records[0], "id": f"e-{k}", "domain": "e", "projections": projections})
    stats = turn_statistics(records)
    first, second = stats["d"][False]
    assert (first["turn"], first["n"], first["mean"]) == (1, 3, pytest.approx(1.0))
    half = t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # values 0, 1, 2: sample std 1
    assert (first["ci_low"], first["ci_high"]) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert second["ci_low"] < second["mean"] < second["ci_high"] and second["mean"] == pytest.approx(2.0)
    assert stats["d"][True] == [{"turn": 1, "mean": 7.0, "ci_low": None, "ci_high": None, "n": 1}]
    assert [(row["turn"], row["n"]) for row in stats["e"][False]] == [(1, 1), (2, 2)]  # empty replies left out
    assert plot_domains(stats, tmp_path / "drift.png").stat().st_size > 0


def test_group_folds_never_split_a_conversation() -> None:
    groups = np.array([f"c{k % 7}" for k in range(40)], dtype=object)
    splits = group_folds(groups, 3)
    assert len(splits) == 3
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([test for _, test in splits]).tolist()) == list(range(40))
    assert len(group_folds(np.array(["a", "b", "a"], dtype=object), 5)) == 2  # one fold per conversation
    with pytest.raises(PersonaAxisError, match="2 conversations"):
        group_folds(np.array(["a", "a"], dtype=object), 5)


def test_predictor_recovers_a_linear_signal_and_not_noise() -> None:
    embedder = FakeEmbedder()
    weights = np.random.default_rng(0).standard_normal(embedder.dim)
    records = synthetic_records(30, 4, lambda text: float(embedder.encode([text])[0] @ weights))
    X, y_abs, y_delta, groups = drift_dataset(records, embedder)
    assert X.shape == (120, 16) and y_abs.shape == y_delta.shape == groups.shape == (120,)
    assert np.isnan(y_delta[::4]).all() and not np.isnan(y_delta[1::4]).any()
    assert y_delta[1] == pytest.approx(y_abs[1] - y_abs[0]) and groups[3] == "d-0"
    fitted = fit_drift_predictor(records, embedder=embedder)
    assert fitted["r2_absolute"] > 0.9
    assert (fitted["n_turns"], fitted["n_conversations"], fitted["folds"]) == (120, 30, 5)
    assert "GroupKFold" in fitted["method"]
    shuffled = np.random.default_rng(1).permutation(y_abs).reshape(30, 4)
    noise = [{**r, "projections": row.tolist()} for r, row in zip(records, shuffled)]
    assert fit_drift_predictor(noise, embedder=embedder)["r2_absolute"] < 0.3
    with pytest.raises(PersonaAxisError, match="2 conversations"):
        fit_drift_predictor(records[:1], embedder=embedder)


def test_conversations_of_two_runs_stay_apart(tmp_path: Path) -> None:
    records = synthetic_records(3, 2, lambda text: float(len(text)))
    for run in ("uncapped", "capped"):
        with RunStore.open(tmp_path / run) as store:
            store.append("conversations", [{**r, "capped": run == "capped"} for r in records])
    loaded = load_simulations([tmp_path / "uncapped", tmp_path / "capped"])
    *_, groups = drift_dataset(loaded, FakeEmbedder())
    assert len(set(groups)) == 6 and groups[0] == f"{tmp_path / 'uncapped'}/d-0"  # same ids, different runs
    assert set(turn_statistics(loaded)["d"]) == {False, True}


def test_simulations_load_in_plan_order_whatever_order_batches_were_written(tmp_path: Path) -> None:
    plan = conversation_plan("all", 2)  # coding, writing, therapy, philosophy: not alphabetical
    records = [{"id": cid, "domain": persona.domain} for cid, persona in plan]
    with RunStore.open(tmp_path / "run") as store:  # batches appended as a cluster might finish them
        for batch in (records[6:], records[2:4], records[:2], records[4:6]):
            store.append("conversations", batch)
    assert [r["id"] for r in load_simulations([tmp_path / "run"])] == [cid for cid, _ in plan]


def test_lowest_turns_carry_their_text() -> None:
    records = synthetic_records(2, 3, lambda text: -float(text.split()[-1]))
    lowest = lowest_turns(records, k=3)
    assert [(x["conversation"], x["turn"], x["projection"]) for x in lowest] == [("d-0", 3, -2.0), ("d-1", 3, -2.0),
                                                                                  ("d-0", 2, -1.0)]
    assert lowest[0]["user"] == "conversation 0 message 2" and lowest[0]["reply"] == "reply 0.2"
    assert lowest[0]["domain"] == "d"


def test_user_spec_builds_each_kind_of_simulator(tiny_llama: LoadedModel, tiny_model_dir: str,
                                                server: FakeServer) -> None:
    same = UserSpec(max_new_tokens=3, seed=4).build(tiny_llama)
    assert isinstance(same, LocalUserSimulator) and same.lm is tiny_llama and same.id.endswith(":m3:s4")
    other = UserSpec(model=tiny_model_dir, dtype="float32", device="cpu").build(tiny_llama)
    assert isinstance(other, LocalUserSimulator) and other.lm is not tiny_llama
    assert UserSpec(model=tiny_model_dir, dtype="float32", device="cpu").build(tiny_llama).lm is other.lm  # loaded once
    remote = UserSpec(url=server.base_url, url_model="user-m", temperature=0.5).build(tiny_llama)
    assert isinstance(remote, OpenAIUserSimulator) and remote.id.startswith("openai:user-m@")
    with pytest.raises(PersonaAxisError, match="needs the endpoint's model name"):
        UserSpec(url=server.base_url)
    with pytest.raises(PersonaAxisError, match="no local user model"):
        UserSpec(url=server.base_url, url_model="user-m", model=tiny_model_dir)
    with pytest.raises(PersonaAxisError, match="give the URL"):
        UserSpec(url_model="user-m")


def test_openai_simulator_posts_swapped_roles(server: FakeServer) -> None:
    server.play(Reply("  I still can't sleep though.  "))
    persona = load_domains("therapy")["therapy"][0]
    history = [{"role": "user", "content": persona.opening}, {"role": "assistant", "content": "That sounds hard."}]
    simulator = OpenAIUserSimulator(server.base_url, "user-m", timeout_s=5)
    assert simulator.next_messages([persona, persona], [history, history]) == ["I still can't sleep though."] * 2
    assert len(server.requests) == 2
    path, _, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "user-m"
    assert body["messages"][0]["role"] == "system" and persona.persona in body["messages"][0]["content"]
    assert [m["role"] for m in body["messages"][2:]] == ["assistant", "user"]
    assert body["messages"][-1]["content"] == "That sounds hard."
    server.play(Reply(status=401))
    with pytest.raises(PersonaAxisError, match="HTTP 401"):
        simulator.next_messages([persona], [history])


def test_openai_simulator_unreachable_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    simulator = OpenAIUserSimulator(f"http://127.0.0.1:{port}/v1", "user-m", timeout_s=2, backoff_s=0.01)
    persona = load_domains("philosophy")["philosophy"][0]
    with pytest.raises(PersonaAxisError, match="unreachable"):
        simulator.next_messages([persona], [[{"role": "user", "content": persona.opening}]])


def test_cli_simulate_and_drift_report(tiny_model_dir: str, axis: Axis, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    save_axis(axis, tmp_path / "axis.safetensors")
    out = tmp_path / "run"
    args = ["simulate", "--model", tiny_model_dir, "--dtype", "float32", "--axis", str(tmp_path / "axis.safetensors"),
            "--domain", "philosophy", "--turns", "2", "--n", "2", "--max-new-tokens", str(TOKENS),
            "--user-max-new-tokens", str(TOKENS), "--out", str(out)]
    assert main([*args, "--plot", str(tmp_path / "sim.png")]) == 0
    text = capsys.readouterr().out
    assert "=== philosophy (uncapped)" in text and "turn   2" in text and (tmp_path / "sim.png").exists()
    assert main([*args, "--json"]) == 0  # resumed: nothing new to simulate
    shown = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in shown["conversations"]] == ["philosophy-c0000", "philosophy-c0001"]
    assert [row["n"] for row in shown["statistics"]["philosophy"]["uncapped"]] == [2, 2]

    monkeypatch.setattr(drift_predictor, "load_embedder", FakeEmbedder)
    assert main(["drift-report", str(out), "--lowest", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["predictor"]["n_conversations"], report["predictor"]["folds"]) == (2, 2)
    assert len(report["lowest"]) == 2 and report["lowest"][0]["projection"] <= report["lowest"][1]["projection"]
    assert main(["drift-report", str(out), "--lowest", "1", "--plot", str(tmp_path / "report.png")]) == 0
    text = capsys.readouterr().out
    assert "R² of the next reply's projection" in text and "    user:  " in text and "    reply: " in text

    assert main([*args[:-2], "--domain", "cooking"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose one of coding, writing, therapy, philosophy" in err
    assert main(["drift-report", str(tmp_path / "nothing")]) == 2
    assert "run `persona-axis simulate" in capsys.readouterr().err


def test_cli_simulate_steered_records_its_measured_layer(tiny_model_dir: str, axis: Axis, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    save_axis(axis, tmp_path / "axis.safetensors")
    args = ["simulate", "--model", tiny_model_dir, "--dtype", "float32", "--axis", str(tmp_path / "axis.safetensors"),
            "--domain", "coding", "--turns", "1", "--n", "1", "--max-new-tokens", str(TOKENS),
            "--user-max-new-tokens", str(TOKENS)]
    assert main([*args, "--steer", "2@1"]) == 0
    assert "projection at layer 0" in capsys.readouterr().out  # the middle layer 1 is steered
    assert main([*args, "--steer", "2@1", "--layer", "1"]) == 2
    assert "--layer 1 is intervened on" in capsys.readouterr().err
    assert main([*args, "--config", str(tmp_path / "capping")]) == 2
    assert "--config is only used with --cap" in capsys.readouterr().err


def test_drift_report_leaves_unfinished_conversations_out_unless_asked(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    records = synthetic_records(4, 2, lambda text: float(len(text)))
    half = {k: records[3][k] for k in ("id", "domain", "persona_id", "capped", "layer")}
    with RunStore.open(tmp_path) as store:
        store.append("conversations", records[:3])
        store.append("turns", [{**half, "turn": 1, "user": "u", "reply": "r", "projection": 0.5},
                               {**half, "turn": 3, "user": "u", "reply": "r", "projection": 0.5}])  # turn 2 missing
    [unfinished] = [r for r in load_simulations([tmp_path], unfinished=True) if not r["finished"]]
    assert unfinished["projections"] == [0.5] and [m["role"] for m in unfinished["messages"]] == ["user", "assistant"]
    monkeypatch.setattr(drift_predictor, "load_embedder", FakeEmbedder)
    assert main(["drift-report", str(tmp_path), "--folds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["predictor"]["n_conversations"] == 3 and report["unfinished_left_out"] == 1
    assert main(["drift-report", str(tmp_path), "--folds", "2", "--include-unfinished", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["predictor"]["n_conversations"] == 4 and report["unfinished_left_out"] == 0
    assert main(["drift-report", str(tmp_path), "--folds", "2"]) == 0
    assert "1 unfinished conversations left out" in capsys.readouterr().out
