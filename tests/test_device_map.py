"""Models split by a device map (accelerate): capture, interventions and the turn-by-turn monitor read and change the
same residual stream as on the whole model. On this CPU-only machine the split is layers offloaded to disk, whose
weights accelerate's own hooks load at each forward, next to ours; the CUDA path (device_map="auto" over GPUs) is the
same code, untested here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model

from persona_axis.decode.capture import response_means_by_forward
from persona_axis.decode.generate import generate
from persona_axis.decode.interventions import Addition, Cap
from persona_axis.model.loading import LoadedModel, execution_device, load_model, wrap_model

CONVERSATIONS = [[{"role": "user", "content": "Hello there, who are you?"}],
                 [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where to?"}]]
# Two map groups: embeddings, layer 0 and the head stay in memory; layers 1 and 2 live on disk.
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture()
def whole(tiny_model_dir: str) -> LoadedModel:
    return load_model(tiny_model_dir, dtype="float32", device="cpu", progress=False)


@pytest.fixture()
def split(tiny_model_dir: str, tmp_path: Path) -> Iterator[LoadedModel]:
    lm = load_model(tiny_model_dir, dtype="float32", device="cpu", progress=False)
    model = dispatch_model(lm.model, device_map=SPLIT, offload_dir=str(tmp_path / "offload"))
    assert lm.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really not in memory
    yield wrap_model(model, lm.tokenizer, name=lm.name, source_hash=lm.source_hash)


def _generate(lm: LoadedModel, **kwargs: object) -> tuple[list[str], torch.Tensor]:
    result = generate(lm, CONVERSATIONS, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3, **kwargs)  # type: ignore[arg-type]
    return result.texts, result.captured_means()


def test_captured_means_of_a_split_model_equal_the_whole_models(whole: LoadedModel, split: LoadedModel) -> None:
    texts, means = _generate(whole)
    split_texts, split_means = _generate(split)
    assert split_texts == texts and torch.equal(split_means, means)
    ids = [[5, 6, 7, 8], [9, 10]]
    assert torch.equal(response_means_by_forward(split, ids, [[11, 12], [13]], range(3)),
                       response_means_by_forward(whole, ids, [[11, 12], [13]], range(3)))


def test_interventions_on_an_offloaded_layer_act_as_on_the_whole_model(whole: LoadedModel, split: LoadedModel) -> None:
    torch.manual_seed(0)
    direction = torch.randn(64)
    interventions = {1: [Addition(direction, coef=3.0)], 2: [Cap(direction, floor=2.0)]}
    plain = _generate(whole)[1]
    texts, means = _generate(whole, interventions=interventions)
    split_texts, split_means = _generate(split, interventions=interventions)
    assert not torch.equal(means, plain)  # the interventions change the stream
    assert split_texts == texts and torch.equal(split_means, means)


def test_the_monitor_projects_a_split_model_as_the_whole_model(whole: LoadedModel, split: LoadedModel) -> None:
    from persona_axis.axis import Axis
    from persona_axis.control.monitor import ConversationProjector

    axis = Axis(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)))
    conversation = [*CONVERSATIONS[1], {"role": "assistant", "content": "To the islands."},
                    {"role": "user", "content": "And then?"}]
    turns = {}
    for name, lm in (("whole", whole), ("split", split)):
        projector = ConversationProjector(lm, axis, layers=[0, 1, 2], layer=2)  # layer 2 lives on disk in the split
        turns[name] = [t.by_layer for t in projector.add_turns(conversation)]
    assert len(turns["whole"]) == 4 and turns["split"] == turns["whole"]


def test_device_map_auto_loads_through_accelerate(tiny_model_dir: str, whole: LoadedModel) -> None:
    auto = load_model(tiny_model_dir, dtype="float32", device_map="auto", progress=False)
    assert auto.device == torch.device("cpu")  # no GPU here: accelerate keeps every part in memory
    assert torch.equal(_generate(auto)[1], _generate(whole)[1])


def test_execution_device_is_the_first_accelerator_of_the_map() -> None:
    model = torch.nn.Linear(2, 2)
    model.hf_device_map = {"embed": 0, "layers.0": 0, "layers.1": 1, "head": "cpu"}  # type: ignore[assignment]
    assert execution_device(model) == torch.device("cuda:0")
    model.hf_device_map = {"embed": "cpu", "layers.0": "cuda:1", "head": "disk"}  # type: ignore[assignment]
    assert execution_device(model) == torch.device("cuda:1")
    model.hf_device_map = {"embed": "cpu", "layers.0": "disk"}  # type: ignore[assignment]
    assert execution_device(model) == torch.device("cpu")
    del model.hf_device_map
    assert execution_device(model) == torch.device("cpu")
