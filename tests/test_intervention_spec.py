"""One intervention spec: the parsers of every source, every kind at every position in both forms (the hook form
of `generate` and the serving engine's per-row form), through chat and the server, and a kind added in a test."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch
from conftest import tiny_model
from serving import EXPERIMENT, tiny_axis_and_config
from test_capping import make_run
from torch import Tensor

from persona_axis.apps.chat import ChatSession
from persona_axis.apps.server import PersonaServer
from persona_axis.apps.server_http import build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.axis import Axis, save_axis
from persona_axis.control.calibration import calibrate
from persona_axis.control.capping import save_config
from persona_axis.control.spec import (
    SpecContext,
    ablate_item,
    build_interventions,
    cap_item,
    default_norms,
    describe_interventions,
    load_interventions,
    steer_item,
)
from persona_axis.decode.engine import Engine, run_to_end
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import (
    Ablation,
    Addition,
    Cap,
    Intervention,
    Item,
    RequestContext,
    item_layer,
    item_number,
    item_positions,
    project,
    steer,
)
from persona_axis.decode.requests import Sampling
from persona_axis.decode.row_interventions import RowSettings
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel, wrap_model

HELLO = [{"role": "user", "content": "Tell me about the lighthouse on the northern cliffs."}]
TOKENS = 6


@pytest.fixture(scope="module")
def lm(tokenizer_module: Any) -> LoadedModel:
    return wrap_model(tiny_model("llama"), tokenizer_module, name="tiny-llama")


@pytest.fixture(scope="module")
def tokenizer_module(embedded_dir: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(embedded_dir)


def test_cli_strings_become_items() -> None:
    assert steer_item("-2@15") == {"kind": "steer", "layer": 15, "coef": -2.0, "units": "axis"}
    assert steer_item(" +0.5 @ 3 ") == {"kind": "steer", "layer": 3, "coef": 0.5, "units": "axis"}
    assert steer_item("-0.5n@15/last") == {"kind": "steer", "layer": 15, "coef": -0.5, "units": "norm",
                                          "positions": "last"}
    assert steer_item("1e-1n@0")["coef"] == pytest.approx(0.1)
    for bad in ("-2", "@3", "2@", "x@3", "2@-1", "2x@3", "2nn@3", "2@1.5", "n@3"):
        with pytest.raises(PersonaAxisError, match="COEF@LAYER.*COEFn@LAYER"):
            steer_item(bad)
    assert ablate_item("4") == {"kind": "ablate", "layer": 4, "value": 0.0}
    assert ablate_item("4=default/reply") == {"kind": "ablate", "layer": 4, "value": "default", "positions": "reply"}
    assert ablate_item("4=-1.5")["value"] == -1.5
    with pytest.raises(PersonaAxisError, match="--ablate expects LAYER"):
        ablate_item("4=high")
    assert cap_item("layers_21:26-p0.25/last") == {"kind": "cap", "experiment": "layers_21:26-p0.25",
                                                   "positions": "last"}


def test_items_build_every_kind_and_bad_items_are_one_line_errors(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    axis = make_run(tmp_path, layers=3, hidden=64)
    ctx = SpecContext(tiny_llama, axis, tmp_path)
    norms = default_norms(tmp_path)
    built = build_interventions(ctx, [steer_item("-0.5n@1/last"), steer_item("2@2"), ablate_item("0=default"),
                                      {"kind": "cap", "layer": 2, "floor": "default", "positions": "reply"}])
    [relative], [cap, plain], [ablation] = built[1], built[2], built[0]
    assert isinstance(relative, Addition) and relative.positions == "last"
    moved = relative.coef * relative.vector  # what the addition adds at layer 1
    assert float(moved.norm()) == pytest.approx(0.5 * float(norms[1]), rel=1e-5)
    assert float(moved @ axis.unit(1)) == pytest.approx(-0.5 * float(norms[1]), rel=1e-5)  # away from the Assistant
    assert isinstance(plain, Addition) and isinstance(cap, Cap)  # the cap acts before the addition at layer 2
    torch.testing.assert_close(plain.coef * plain.vector, 2 * axis.vectors[2])
    defaults = torch.load(tmp_path / "expected_means.pt", weights_only=True)[:3].mean(0)  # the run's default rows
    assert isinstance(ablation, Ablation)
    assert ablation.coef == pytest.approx(float(defaults[0] @ axis.unit(0)), rel=1e-5)
    assert cap.floor == pytest.approx(float(defaults[2] @ axis.unit(2)), rel=1e-5) and cap.positions == "reply"
    bare = SpecContext(tiny_llama, axis)  # an axis file: no run directory, no default activations
    for items, message in [([steer_item("-0.5n@1")], "give --axis as a run directory"),
                           ([steer_item("1@3")], "steer layer 3 is out of range"),
                           ([{"kind": "steer", "layer": 1}], "finite number 'coef'"),
                           ([{"kind": "steer", "layer": 1, "coef": 1, "positions": "first"}], "positions must be"),
                           ([{"kind": "rotate", "layer": 1}], "unknown intervention kind 'rotate'"),
                           ([cap_item(EXPERIMENT)], "needs a capping config"),
                           (["1@1"], "must be an object")]:
        with pytest.raises(PersonaAxisError, match=message):
            build_interventions(bare, items)  # type: ignore[arg-type]
    with pytest.raises(PersonaAxisError, match="needs .*vectors.safetensors"):
        default_norms(tmp_path / "nowhere")


def test_options_give_one_rule_for_config_cap_and_relative_steering(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    run = tmp_path / "run"
    axis = make_run(run, layers=3, hidden=64)
    save_config(calibrate(run, [range(1, 3)], [0.5]), run / "capping")
    with pytest.raises(PersonaAxisError, match="--config is only used with --cap"):
        load_interventions(tiny_llama, axis, run, config=run / "capping")
    capped = load_interventions(tiny_llama, axis, run, cap="layers_1:3-p0.5", steer=["1n@0"], ablate=["1"])
    assert sorted(capped) == [0, 1, 2] and describe_interventions(capped) == "ablated+capped+steered"
    assert [type(i) for i in capped[1]] == [Ablation, Cap] and isinstance(capped[0][0], Addition)
    bare = tmp_path / "axis.safetensors"
    save_axis(axis, bare)
    assert describe_interventions(load_interventions(tiny_llama, axis, bare, steer=["1@0"])) == "steered"
    with pytest.raises(PersonaAxisError, match="give --axis as a run directory"):
        load_interventions(tiny_llama, axis, bare, steer=["1n@0"])
    assert describe_interventions({}) == "plain"


def _units(lm: LoadedModel) -> Tensor:
    torch.manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(lm.n_layers, lm.hidden_size), dim=-1)


def _kinds(lm: LoadedModel, positions: Any) -> dict[str, dict[int, list[Intervention]]]:
    """One intervention of each kind at `positions`, strong enough to change the tiny model's replies."""
    u = _units(lm)
    return {"cap": {1: [Cap(u[1], 0.8, positions=positions)]},
            "steer": {1: [Addition(u[1], -4.0, positions=positions)]},
            "ablate": {1: [Ablation(u[1], 3.0, positions=positions)]},
            "two": {1: [Addition(u[1], 2.0, positions=positions), Cap(u[1], 1.0, positions=positions)],
                    2: [Addition(u[2], -2.0, positions=positions)]}}


def _ids(lm: LoadedModel) -> list[int]:
    return lm.tokenizer(lm.chat_prompt(HELLO), add_special_tokens=False).input_ids  # type: ignore[no-any-return]


@pytest.mark.parametrize("positions", ["all", "last", "reply"])
def test_each_kind_gives_the_same_reply_in_the_hook_form_and_in_a_mixed_engine_batch(lm: LoadedModel,
                                                                                        positions: Any) -> None:
    """generate (hook form) and the engine (per-row form, all kinds in one batch) agree token for token;
    and the positions matter: each kind changes the reply, and 'all' differs from 'reply'."""
    u = _units(lm)
    kinds = _kinds(lm, positions)
    jobs = [(_ids(lm), Sampling(TOKENS), RowSettings(kinds[k], watch=(0, u[0]))) for k in kinds]
    served = run_to_end(Engine(lm, max_rows=len(jobs)), jobs)
    plain = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, watch=(0, u[0]))
    for end, name in zip(served, kinds):
        offline = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, interventions=kinds[name],
                           watch=(0, u[0]))
        assert end.token_ids == offline.token_ids[0], name
        assert offline.projections is not None
        torch.testing.assert_close(torch.tensor(end.projections), torch.tensor(offline.projections[0]),
                                   atol=1e-5, rtol=1e-5)
        assert offline.token_ids[0] != plain.token_ids[0], f"{name} at {positions} changed nothing"
    if positions == "reply":
        everywhere = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, interventions=_kinds(lm, "all")["steer"])
        reply_only = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, interventions=kinds["steer"])
        assert everywhere.token_ids != reply_only.token_ids


def test_positions_pick_the_tokens_in_the_hook_form(lm: LoadedModel) -> None:
    """A prompt pass: 'all' moves every position, 'last' only the last, 'reply' none; a one-token pass: all move."""
    hidden = torch.randn(2, 5, lm.hidden_size)
    u = _units(lm)[1]
    for positions, moved in [("all", [0, 1, 2, 3, 4]), ("last", [4]), ("reply", [])]:
        out = Ablation(u, 3.0, positions=positions)(hidden)
        changed = (out - hidden).abs().sum(-1).gt(1e-6).all(0)
        assert changed.nonzero().flatten().tolist() == moved, positions
        assert torch.allclose(project(out, u[None])[:, moved], torch.tensor(3.0), atol=1e-5)
        one = Ablation(u, 3.0, positions=positions)(hidden[:, :1])
        assert torch.allclose(project(one, u[None]), torch.tensor(3.0), atol=1e-5)


def test_chat_streams_ablations_and_positions_like_say(lm: LoadedModel) -> None:
    """The streamed chat (the server's engine) used to drop `positions` and refuse ablations."""
    torch.manual_seed(0)
    axis = Axis(torch.randn(lm.n_layers, lm.hidden_size))
    interventions: dict[int, list[Intervention]] = {1: [Ablation(axis.vectors[1], 4.0, positions="last")],
                                                    2: [Addition(axis.vectors[2], -2.0, positions="reply")]}
    said = ChatSession(lm, axis, interventions, max_new_tokens=TOKENS).say("Hello?")
    streamed = ChatSession(lm, axis, interventions, max_new_tokens=TOKENS).stream("Hello?", lambda _: None)
    assert streamed.text == said.text and streamed.layer == said.layer == 0
    everywhere = {1: [Ablation(axis.vectors[1], 4.0)], 2: [Addition(axis.vectors[2], -2.0)]}
    assert ChatSession(lm, axis, everywhere, max_new_tokens=TOKENS).stream("Hello?", lambda _: None).text != said.text


@dataclass
class Scale(Intervention):
    """A kind defined here, in the test: x ← x + (factor − 1)(x·û)û (scales the component along a direction)."""

    direction: Tensor
    factor: float = 1.0
    name: ClassVar[str] = "toy_scale"
    label: ClassVar[str] = "scaled"

    def vectors(self) -> list[Tensor]:
        return [self.direction]

    def row_params(self) -> dict[str, Tensor]:
        return {"unit": torch.nn.functional.normalize(self.direction.float(), dim=0),
                "factor": torch.tensor(float(self.factor))}

    @staticmethod
    def apply_rows(hidden: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        unit = params["unit"]
        grow = (params["factor"][:, None] - 1) * project(hidden, unit)
        return hidden + (grow[..., None] * unit[:, None, :]).to(hidden.dtype), None

    @classmethod
    def from_request(cls, item: Item, ctx: RequestContext) -> list[tuple[int, Intervention]]:
        layer = item_layer(item, ctx)
        return [(layer, cls(ctx.axis_vector(layer), item_number(item, "factor"), positions=item_positions(item)))]


def test_a_kind_added_in_a_test_runs_through_generate_and_the_server(tokenizer_module: Any) -> None:
    lm = wrap_model(tiny_model("llama"), tokenizer_module, name="tiny-llama")
    axis, config = tiny_axis_and_config(lm)
    scaled = {1: [Scale(axis.vectors[1], -6.0)]}
    offline = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, interventions=scaled)
    plain = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False)
    assert offline.texts != plain.texts and describe_interventions(scaled) == "scaled"
    with steer(lm, scaled):
        assert generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False).texts == offline.texts
    server = PersonaServer(lm, axis, config)
    with BackgroundServer(build_app(server)) as background:
        body = {"model": "m", "messages": HELLO, "max_tokens": TOKENS, "temperature": 0,
                "persona_axis": {"interventions": [{"kind": "toy_scale", "layer": 1, "factor": -6.0}]}}
        reply = httpx.post(f"{background.url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["content"] == offline.texts[0]


def test_the_server_takes_positions_ablations_and_norm_relative_steering(tokenizer_module: Any) -> None:
    """Every kind and unit the CLI has, in one request each, equal to `generate` with the same interventions."""
    lm = wrap_model(tiny_model("llama"), tokenizer_module, name="tiny-llama")
    axis, config = tiny_axis_and_config(lm)
    torch.manual_seed(11)
    defaults = 3 * torch.randn(lm.n_layers, lm.hidden_size)
    ctx = SpecContext(lm, axis, config=config, defaults=defaults)
    server = PersonaServer(lm, axis, config, defaults=defaults)
    requests: list[dict[str, Any]] = [
        {"steer": [{"layer": 1, "coef": -2.0, "units": "norm", "positions": "last"}]},
        {"steer": ["-2n@1/reply"]},
        {"ablate": [{"layer": 1, "value": "default"}, {"layer": 2, "value": 5.0, "positions": "last"}]},
        {"cap": f"{EXPERIMENT}/reply"},
        {"interventions": [{"kind": "cap", "layer": 1, "floor": 2.0}, {"kind": "ablate", "layer": 2}]},
    ]
    with BackgroundServer(build_app(server)) as background:
        for extension in requests:
            body = {"model": "m", "messages": HELLO, "max_tokens": TOKENS, "temperature": 0,
                    "persona_axis": {**extension, "layer": 0}}
            reply = httpx.post(f"{background.url}/v1/chat/completions", json=body, timeout=60).json()
            items = ([cap_item(extension["cap"])] if "cap" in extension else []) + [
                steer_item(s) if isinstance(s, str) else {**s, "kind": "steer"} for s in extension.get("steer", [])] + [
                {**a, "kind": "ablate"} for a in extension.get("ablate", [])] + extension.get("interventions", [])
            interventions = build_interventions(ctx, items)
            offline = generate(lm, [HELLO], max_new_tokens=TOKENS, capture=False, interventions=interventions,
                               watch=(0, axis.unit(0)))
            assert reply["choices"][0]["message"]["content"] == offline.texts[0], extension
            assert offline.projections is not None
            assert reply["persona_axis"]["projections"] == pytest.approx(offline.projections[0], abs=1e-4)
        without = PersonaServer(lm, axis, config)
    with BackgroundServer(build_app(without)) as background:
        body = {"model": "m", "messages": HELLO, "persona_axis": {"steer": ["-2n@1"]}}
        response = httpx.post(f"{background.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "default-Assistant activation" in response.json()["error"]["message"]


CHUNK = 16  # prefill chunk of the chunked-prefill tests


def _long_prompt(lm: LoadedModel) -> list[int]:
    return lm.tokenizer(lm.chat_prompt([{"role": "user", "content": HELLO[0]["content"] * 6}]),
                        add_special_tokens=False).input_ids  # type: ignore[no-any-return]


def _chunked_equals_whole(lm: LoadedModel, prompt: list[int], settings: RowSettings) -> None:
    """`prompt` prefilled chunk by chunk (another reply decoding beside it) gets the tokens and projections of
    one whole prefill."""
    engine = Engine(lm, max_rows=2, prefill_chunk=CHUNK)
    ends: list[Any] = []
    engine.submit(_ids(lm), Sampling(TOKENS + 12), RowSettings(), lambda e: None)
    engine.step()  # the short reply decodes, so the long prompt is chunked
    engine.submit(prompt, Sampling(TOKENS), settings, lambda e: ends.append(e) if hasattr(e, "reason") else None)
    while not ends:
        engine.step()
    [whole] = run_to_end(Engine(lm), [(prompt, Sampling(TOKENS), settings)])
    assert ends[0].token_ids == whole.token_ids
    torch.testing.assert_close(torch.tensor(ends[0].projections), torch.tensor(whole.projections), atol=1e-4, rtol=1e-4)


def test_last_position_interventions_act_once_in_a_chunked_prefill(lm: LoadedModel) -> None:
    """A long prompt prefilled chunk by chunk gets its 'last'-position ablation at the prompt's last token only,
    as in one whole prefill: not at the end of every chunk."""
    u = _units(lm)
    prompt = _long_prompt(lm)
    assert len(prompt) > 3 * CHUNK
    _chunked_equals_whole(lm, prompt, RowSettings({1: [Ablation(u[1], 6.0, positions="last")]},
                                                  watch=(2, u[2])))  # read downstream


def test_a_one_token_last_chunk_is_still_the_prompt(lm: LoadedModel) -> None:
    """A chunked prompt whose final chunk is one token: 'reply' interventions must not act on it (it is the
    prompt's last token, not a generated one), so the reply equals a whole prefill's."""
    u = _units(lm)
    prompt = _long_prompt(lm)
    prompt = prompt[: CHUNK * ((len(prompt) - 1) // CHUNK) + 1]  # k chunks and one token
    _chunked_equals_whole(lm, prompt, RowSettings({1: [Addition(u[1], -6.0, positions="reply")]}, watch=(2, u[2])))


def test_a_number_too_large_for_a_float_is_a_one_line_error(tiny_llama: LoadedModel) -> None:
    axis = Axis(torch.randn(tiny_llama.n_layers, tiny_llama.hidden_size))
    with pytest.raises(PersonaAxisError, match="finite number 'coef'"):
        build_interventions(SpecContext(tiny_llama, axis), [{"kind": "steer", "layer": 1, "coef": 10 ** 400}])
