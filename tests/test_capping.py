from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from persona_axis.axis import Axis, axis_metadata, save_axis
from persona_axis.control.calibration import calibrate, percentile_rank, run_projections
from persona_axis.control.capping import (
    DEFAULT_MEAN,
    CapLayer,
    CappingConfig,
    Experiment,
    default_layer_block,
    experiment_id,
    export_torch_config,
    import_torch_config,
    load_config,
    parse_experiment_id,
    save_config,
)
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import LoadedModel
from persona_axis.store import RunStore

LAYERS, HIDDEN = 4, 16
# id -> role; scores per judge: "old" judged everything 3, "new" (the run's latest judge) only some.
ROLES = ({f"default|p0|q{i}": "default" for i in range(3)} | {f"pirate|p0|q{i}": "pirate" for i in range(5)}
         | {f"trait:calm|p0|q{i}": "trait:calm" for i in range(2)})
DEFAULTS = {i for i, r in ROLES.items() if r == "default"}
TRAITS = {i for i, r in ROLES.items() if r.startswith("trait:")}
NEW_SCORE3 = {"pirate|p0|q0", "pirate|p0|q3"}


def make_run(root: Path, layers: int = LAYERS, hidden: int = HIDDEN, spread: float = 1.0, seed: int = 0) -> Axis:
    """A run directory with two activation chunks, rollouts, two judges' scores, vectors and an axis."""
    torch.manual_seed(seed)
    ids = list(ROLES)
    means = torch.randn(len(ids), layers, hidden) * spread
    axis = Axis(torch.randn(layers, hidden), axis_metadata("tiny-llama", "", "manifest"))
    with RunStore.open(root) as store:
        for index, (start, stop) in enumerate([(0, 5), (5, len(ids))]):
            store.save_tensors(f"activations/chunk-{index:05d}.safetensors", {"means": means[start:stop]},
                               {"ids": json.dumps(ids[start:stop])})
        store.append("rollouts", [{"id": i, "role": role, **({"kind": "trait"} if i in TRAITS else {})}
                                  for i, role in ROLES.items()])
        store.append("scores", [{"id": i, "score": 3, "judge": "old"} for i, r in ROLES.items() if r != "default"])
        store.append("scores", [{"id": i, "score": 3 if i in NEW_SCORE3 else 2, "judge": "new"}
                                for i, r in ROLES.items() if r != "default"])
        store.save_tensors("vectors.safetensors", {"default": means[:3].mean(0)}, {"summary": json.dumps({"judge": "new"})})
    save_axis(axis, root / "axis.safetensors")
    torch.save(means, root / "expected_means.pt")
    return axis


def expected_projections(root: Path, axis: Axis, layers: list[int], ids: set[str]) -> torch.Tensor:
    means = torch.load(root / "expected_means.pt", weights_only=True)
    rows = [k for k, i in enumerate(ROLES) if i in ids]
    return torch.stack([torch.stack([means[r, layer] @ axis.unit(layer) for layer in layers]) for r in rows])


def test_default_layer_block_matches_published_settings() -> None:
    def overlap(a: range, b: range) -> float:
        return len(set(a) & set(b)) / len(set(a) | set(b))

    for n_layers, published in [(64, range(46, 54)), (80, range(56, 72))]:
        block = default_layer_block(n_layers)
        assert abs(block.start - published.start) <= 1 and overlap(block, published) >= 0.7
    block = default_layer_block(30)
    assert 4 <= len(block) <= 5 and abs(block.start - 21) <= 1
    for n in range(1, 120):
        block = default_layer_block(n)
        assert len(block) >= 1 and 0 <= block.start < block.stop <= n and block.step == 1
    with pytest.raises(PersonaAxisError):
        default_layer_block(0)


def test_experiment_id_round_trip_and_bad_ids() -> None:
    assert experiment_id(46, 54, 0.25) == "layers_46:54-p0.25"
    for start, stop, p in [(46, 54, 0.25), (0, 1, 1e-05), (3, 9, 0.123456789), (2, 3, 0.999), (1, 3, DEFAULT_MEAN)]:
        assert parse_experiment_id(experiment_id(start, stop, p)) == (start, stop, p)
    assert experiment_id(1, 3, DEFAULT_MEAN) == "layers_1:3-mean"
    for bad in ["", "layers_46:54", "layers_54:46-p0.25", "layers_4:4-p0.5", "layers_1:2-p1.0", "layers_1:2-p0.0",
                "layers_1:2-pnan", "layers_1:2-p0.5x", "layer_1:2-p0.5", "layers_-1:2-p0.5", "layers_1:2-pmean",
                "layers_1:2-means", "layers_2:1-mean"]:
        with pytest.raises(PersonaAxisError, match="bad experiment id"):
            parse_experiment_id(bad)


def test_calibrate_floors_are_quantiles_of_projections(tmp_path: Path) -> None:
    axis = make_run(tmp_path)
    config = calibrate(tmp_path, [range(1, 3), range(2, 4)], [0.25, 0.9])
    assert list(config.experiments) == ["layers_1:3-p0.25", "layers_1:3-p0.9", "layers_2:4-p0.25", "layers_2:4-p0.9"]
    assert (config.model, config.n_layers, config.hidden_size, config.population) == \
        ("tiny-llama", LAYERS, HIDDEN, "roles+traits")
    expected = expected_projections(tmp_path, axis, [1, 2, 3], set(ROLES) - DEFAULTS)
    default_mean = expected_projections(tmp_path, axis, [1, 2, 3], DEFAULTS).mean(0)
    for eid, experiment in config.experiments.items():
        start, stop, p = parse_experiment_id(eid)
        assert [c.layer for c in experiment.caps] == list(range(start, stop))
        for cap in experiment.caps:
            tau = torch.quantile(expected[:, cap.layer - 1], p)
            torch.testing.assert_close(torch.tensor(cap.floor), tau)
            assert torch.equal(cap.axis, axis.unit(cap.layer))
            torch.testing.assert_close(torch.tensor(cap.stats["default_mean"]), default_mean[cap.layer - 1])


def _rank_by_hand(values: list[float], x: float) -> float:
    """Where x falls among sorted values placed at k / (n − 1), linearly between neighbours (0 or 1 outside)."""
    v = sorted(values)
    if x <= v[0]:
        return 0.0
    if x >= v[-1]:
        return 1.0
    k = max(i for i in range(len(v)) if v[i] <= x)
    return (k + (x - v[k]) / (v[k + 1] - v[k])) / (len(v) - 1)


def test_percentile_rank_inverts_quantile() -> None:
    torch.manual_seed(1)
    values = torch.randn(23, dtype=torch.float64)
    for p in [0.0, 0.1, 0.25, 0.5, 0.77, 1.0]:
        assert percentile_rank(values, float(torch.quantile(values, p))) == pytest.approx(p, abs=1e-9)
    assert percentile_rank(values, float(values.min()) - 1) == 0.0 and percentile_rank(values, 1e9) == 1.0
    assert percentile_rank(torch.tensor([1.0, 2.0, 3.0]), 2.5) == pytest.approx(0.75)


def test_default_mean_floor_and_its_percentile(tmp_path: Path) -> None:
    """Floors at the default mean (layers_A:B-mean) beside percentile floors; every cap ranks the default mean."""
    axis = make_run(tmp_path)
    config = calibrate(tmp_path, [range(1, 3)], [0.25, DEFAULT_MEAN])
    assert list(config.experiments) == ["layers_1:3-p0.25", "layers_1:3-mean"]
    population = expected_projections(tmp_path, axis, [1, 2], set(ROLES) - DEFAULTS)
    default_mean = expected_projections(tmp_path, axis, [1, 2], DEFAULTS).mean(0)
    for k, (low, mean) in enumerate(zip(config.experiment("layers_1:3-p0.25").caps,
                                        config.experiment("layers_1:3-mean").caps)):
        assert mean.floor == pytest.approx(float(default_mean[k]), abs=1e-6) == mean.stats["default_mean"]
        assert low.floor == pytest.approx(float(torch.quantile(population[:, k], 0.25)), abs=1e-6)
        rank = _rank_by_hand(population[:, k].tolist(), float(default_mean[k]))
        assert mean.stats["default_percentile"] == pytest.approx(rank, abs=1e-6) == low.stats["default_percentile"]
        assert float(torch.quantile(population[:, k], rank)) == pytest.approx(mean.floor, abs=1e-5)
        assert 0.0 < rank < 1.0
    only = calibrate(tmp_path, range(1, 3), [DEFAULT_MEAN], population="roles")
    assert list(only.experiments) == ["layers_1:3-mean"]
    roles = expected_projections(tmp_path, axis, [1, 2], set(ROLES) - DEFAULTS - TRAITS)
    assert only.experiment("layers_1:3-mean").caps[0].stats["default_percentile"] == pytest.approx(
        _rank_by_hand(roles[:, 0].tolist(), float(default_mean[0])), abs=1e-6)
    save_config(config, tmp_path / "cap")
    loaded = load_config(tmp_path / "cap").experiment("layers_1:3-mean")
    assert [c.stats for c in loaded.caps] == [c.stats for c in config.experiment("layers_1:3-mean").caps]


def test_calibrate_cli_floor_default_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from persona_axis.cli import main

    make_run(tmp_path)
    calibrate_cli = ["calibrate", str(tmp_path), "--layers", "1:3", "--no-engagement", "--json"]
    assert main([*calibrate_cli, "--floor", "default-mean"]) == 0
    [experiment] = json.loads(capsys.readouterr().out)["experiments"]
    assert experiment["id"] == "layers_1:3-mean" and experiment["floor"] == DEFAULT_MEAN
    for cap in experiment["caps"]:
        assert cap["tau"] == cap["default_mean"] and 0 <= cap["default_percentile"] <= 1
    assert main([*calibrate_cli, "--floor", "default-mean", "--percentile", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(e["id"], e["floor"]) for e in report["experiments"]] == [("layers_1:3-p0.5", 0.5),
                                                                      ("layers_1:3-mean", DEFAULT_MEAN)]
    assert main(calibrate_cli) == 0  # the default is unchanged: one 25th-percentile experiment
    assert [e["id"] for e in json.loads(capsys.readouterr().out)["experiments"]] == ["layers_1:3-p0.25"]
    assert main(["calibrate", str(tmp_path), "--layers", "1:3", "--no-engagement", "--floor", "default-mean"]) == 0
    assert "layers_1:3-mean" in capsys.readouterr().out


@pytest.mark.parametrize("population, ids", [
    ("all", set(ROLES)),
    ("roles+traits", set(ROLES) - DEFAULTS),
    ("roles", set(ROLES) - DEFAULTS - TRAITS),
    ("traits", TRAITS),
    ("default", DEFAULTS),
    ("roles_score3", NEW_SCORE3),  # the latest judge's scores, not the older judge's
])
def test_populations_select_the_right_rollouts(tmp_path: Path, population: str, ids: set[str]) -> None:
    axis = make_run(tmp_path)
    projections = run_projections(tmp_path, axis, [0, 3], population)
    torch.testing.assert_close(projections, expected_projections(tmp_path, axis, [0, 3], ids))


@pytest.mark.parametrize("kwargs, message", [
    ({"percentiles": [0.0]}, "percentiles"),
    ({"percentiles": [1.0]}, "percentiles"),
    ({"percentiles": []}, "percentiles"),
    ({"percentiles": ["median"]}, "percentiles"),
    ({"layers": range(3, 5)}, "layer 4 is out of range"),
    ({"layers": [range(2, 2)]}, "non-empty"),
    ({"population": "everyone"}, "unknown population"),
])
def test_calibrate_refuses_bad_settings_and_writes_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    make_run(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(PersonaAxisError, match=message):
        calibrate(tmp_path, **{"layers": range(1, 3), "percentiles": [0.25], **kwargs})
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_save_load_round_trip(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    config = calibrate(tmp_path / "run", [range(0, 2), range(1, 4)], [0.1, 0.5], population="roles")
    save_config(config, tmp_path / "cap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap.json", "cap.safetensors", "run"]
    for path in ["cap", "cap.json", "cap.safetensors"]:
        loaded = load_config(tmp_path / path)
        assert (loaded.model, loaded.n_layers, loaded.hidden_size, loaded.source, loaded.population) == \
            (config.model, config.n_layers, config.hidden_size, config.source, "roles")
        assert list(loaded.experiments) == list(config.experiments)
        for eid, experiment in config.experiments.items():
            for a, b in zip(experiment.caps, loaded.experiment(eid).caps):
                assert a.layer == b.layer and a.floor == b.floor and torch.equal(a.axis, b.axis)
                assert a.stats == b.stats and set(a.stats) == {"default_mean", "default_percentile"}
    doc = json.loads((tmp_path / "cap.json").read_text())
    assert set(doc["experiments"][0]["caps"][0]) == {"layer", "floor", "vector", "default_mean", "default_percentile"}
    (tmp_path / "cap.safetensors").write_bytes((tmp_path / "cap.safetensors").read_bytes() + b" ")
    with pytest.raises(PersonaAxisError, match="not the vectors file"):
        load_config(tmp_path / "cap")
    with pytest.raises(PersonaAxisError, match="not found"):
        load_config(tmp_path / "missing")


def test_torch_export_import_round_trip_is_exact(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    config = calibrate(tmp_path / "run", [range(0, 2), range(1, 4)], [0.1, 0.75])
    export_torch_config(config, tmp_path / "caps.pt")
    raw = torch.load(tmp_path / "caps.pt", weights_only=True)
    assert set(raw["vectors"]) == {f"layer_{i}" for i in range(4)}  # experiments share one vector per layer
    imported, skips = import_torch_config(tmp_path / "caps.pt", model="tiny-llama")
    assert skips.interventions == skips.experiments == ()
    assert list(imported.experiments) == list(config.experiments)
    torch.manual_seed(5)
    hidden = torch.randn(2, 9, HIDDEN) * 3
    for eid, experiment in config.experiments.items():
        ours, theirs = experiment.interventions(), imported.experiment(eid).interventions()
        assert ours.keys() == theirs.keys()
        for layer in ours:
            assert theirs[layer].floor == ours[layer].floor
            assert torch.equal(theirs[layer](hidden), ours[layer](hidden))


def test_imported_ceiling_matches_the_plain_formula(tmp_path: Path) -> None:
    torch.manual_seed(3)
    v1, v2 = torch.randn(HIDDEN) * 4, torch.randn(HIDDEN) * 0.5
    torch.save({"vectors": {"a": {"layer": 1, "vector": v1}, "b": {"layer": 2, "vector": v2}},
                "experiments": [{"id": "both", "interventions": [{"vector": "a", "cap": 0.5}, {"vector": "b", "cap": -1.0}]}]},
               tmp_path / "foreign.pt")
    interventions = import_torch_config(tmp_path / "foreign.pt")[0].experiment("both").interventions()
    x = torch.randn(3, 5, HIDDEN) * 2
    for layer, v, cap in [(1, v1, 0.5), (2, v2, -1.0)]:
        vhat = v / v.norm()
        expected = x - torch.clamp(x @ vhat - cap, min=0)[..., None] * vhat
        assert (x @ vhat > cap).any() and (x @ vhat < cap).any()
        torch.testing.assert_close(interventions[layer](x), expected, atol=1e-6, rtol=0)


_RAN: list[str] = []


def _side_effect() -> list[str]:
    _RAN.append("unpickled code ran")
    return _RAN


class Payload:
    def __reduce__(self) -> tuple:
        return (_side_effect, ())


@pytest.mark.parametrize("bad, message", [
    ({"vectors": Payload(), "experiments": []}, "tensors-only"),
    ({"vectors": {"a": {"layer": 0, "vector": torch.ones(4)}, "b": {"layer": 1, "vector": torch.ones(5)}},
      "experiments": [{"id": "e", "interventions": [{"vector": "a", "cap": 1.0}]}]}, "different sizes"),
    ({"vectors": {"a": {"layer": 0, "vector": torch.ones(4)}},
      "experiments": [{"id": "e", "interventions": [{"vector": "zzz", "cap": 1.0}]}]}, "known vector"),
    ({"vectors": {"a": {"layer": 0, "vector": torch.zeros(4)}}, "experiments": []}, "all zeros"),
    ({"vectors": {"a": {"layer": 0, "vector": torch.tensor([1.0, math.inf])}}, "experiments": []}, "finite"),
    ({"vectors": {"a": {"layer": 0, "vector": torch.ones(4)}},
      "experiments": [{"id": "e", "interventions": [{"vector": "a", "cap": math.nan}]}]}, "finite"),
    ([torch.ones(3)], "not a capping config"),
])
def test_import_refuses_bad_files(tmp_path: Path, bad: object, message: str) -> None:
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(PersonaAxisError, match=message):
        import_torch_config(tmp_path / "bad.pt")
    assert not _RAN


def _config(hidden: int = 64, n_layers: int = 3, model_hash: str = "") -> CappingConfig:
    caps = [CapLayer(2, torch.ones(hidden), 1.0)]
    return CappingConfig("tiny-llama", model_hash, n_layers, hidden, "test", "all", {"e": Experiment("e", caps)})


def test_model_mismatch_and_unknown_experiment(tiny_llama: LoadedModel) -> None:
    _config(model_hash="abc").check_model(tiny_llama)  # the tiny model has no source hash: not compared
    tiny_llama.source_hash = "def"
    for config in [_config(hidden=32), _config(n_layers=4), _config(model_hash="abc")]:
        with pytest.raises(PersonaAxisError, match=r"capping config was made for tiny-llama \(\[\d, \d+\]"):
            config.check_model(tiny_llama)
    with pytest.raises(PersonaAxisError, match="hidden size is 64"):
        CappingConfig("m", "", 3, 64, "test", "all", {"e": Experiment("e", [CapLayer(0, torch.ones(8), 0.0)])})
    with pytest.raises(PersonaAxisError, match=r"unknown capping experiment 'nope': choose one of e$"):
        _config().experiment("nope")
    with pytest.raises(PersonaAxisError, match="distinct layers"):
        Experiment("twice", [CapLayer(1, torch.ones(4), 0.0), CapLayer(1, torch.ones(4), 1.0)])


def test_score3_population_needs_the_vectors_step(tmp_path: Path) -> None:
    axis = make_run(tmp_path)
    (tmp_path / "vectors.safetensors").unlink()
    with pytest.raises(PersonaAxisError, match="needs .*vectors.safetensors"):
        run_projections(tmp_path, axis, [0], "roles_score3")
