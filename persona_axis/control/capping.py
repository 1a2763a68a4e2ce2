"""Capping configs: floors on the Assistant-Axis projection, calibrated from a run's activations.

A cap at layer l with floor τ raises any hidden state whose projection on the unit axis â_l is
below τ up to τ (see `interventions.Cap`). Floors are calibrated from a run (persona_axis.control.calibration).
An experiment is a set of caps applied together, named "layers_<start>:<stop>-p<percentile>"
(half-open layer range; floors at a percentile of the run's projections) or
"layers_<start>:<stop>-mean" (floors at the mean default-Assistant projection).

Our file pair: `<stem>.safetensors` (one unit vector per distinct capped axis, "layer_<i>") and
`<stem>.json` (model, sizes, provenance, experiments with their floors and each cap's measured
stats: default_mean, default_percentile, engaged_default, engaged_roles where calibration recorded them). Other
tools store a
torch file {"vectors": {name: {"layer", "vector"}}, "experiments": [{"id", "interventions":
[{"vector", "cap"}]}]} where `cap` is a CEILING along the stored vector v:
x ← x − max(0, x·v̂ − cap) v̂. A floor τ along â is exactly the ceiling −τ along −â.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from persona_axis.decode.interventions import Cap
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import ModelShape
from persona_axis.store import atomic_write_bytes
from persona_axis.vectors import unit_vector

FORMAT = "persona-axis/capping-config-v1"
CAP_STATS = ("default_mean", "default_percentile", "engaged_default", "engaged_roles")
DEFAULT_MEAN = "mean"  # in place of a percentile: floors at the mean default-Assistant projection
_ID_PATTERN = re.compile(r"layers_(\d+):(\d+)-(?:p(\d+\.\d+|\d+(?:\.\d+)?e-\d+)|(mean))")


def _unit(vector: Tensor, what: str) -> Tensor:
    """A finite non-zero vector [hidden] as a float32 unit vector; one already unit (±1e-6) is kept bit for bit."""
    v = torch.as_tensor(vector).detach().float().cpu()
    if v.dim() != 1 or not torch.isfinite(v).all():
        raise PersonaAxisError(f"{what} must be a finite 1-D vector, got shape {tuple(v.shape)}")
    if abs(float(v.double().norm()) - 1.0) <= 1e-6:
        return v.clone()
    return unit_vector(v.double(), what).float()


@dataclass(eq=False)
class CapLayer:
    """A floor on the projection at one layer: axis [hidden] unit float32 (normalised on creation).

    stats: what calibration measured about this cap (default_mean, default_percentile, engaged_default,
    engaged_roles).
    """

    layer: int
    axis: Tensor
    floor: float
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer, self.floor = int(self.layer), float(self.floor)
        if self.layer < 0 or not math.isfinite(self.floor):
            raise PersonaAxisError(f"a cap needs a layer >= 0 and a finite floor, got layer {self.layer}, floor {self.floor}")
        self.axis = _unit(self.axis, f"cap axis at layer {self.layer}")


@dataclass(eq=False)
class Experiment:
    """Caps applied together (at most one per layer)."""

    id: str
    caps: list[CapLayer]

    def __post_init__(self) -> None:
        layers = [cap.layer for cap in self.caps]
        if not layers or len(set(layers)) != len(layers):
            raise PersonaAxisError(f"experiment {self.id!r} needs caps at distinct layers, got layers {layers}")

    def interventions(self) -> dict[int, Cap]:
        """{layer: Cap} for `generate(..., interventions=...)` or `steer`."""
        return {cap.layer: Cap(cap.axis, floor=cap.floor) for cap in self.caps}


@dataclass(eq=False)
class CappingConfig:
    """Experiments for one model. n_layers 0 means unknown (an imported config); model_hash "" likewise."""

    model: str
    model_hash: str
    n_layers: int
    hidden_size: int
    source: str
    population: str
    experiments: dict[str, Experiment]

    def __post_init__(self) -> None:
        for key, experiment in self.experiments.items():
            for cap in experiment.caps:
                if key != experiment.id or cap.axis.shape[0] != self.hidden_size or 0 < self.n_layers <= cap.layer:
                    raise PersonaAxisError(
                        f"experiment {key!r} (id {experiment.id!r}) does not fit the config: its axis at layer "
                        f"{cap.layer} has size {cap.axis.shape[0]}; the config's hidden size is {self.hidden_size} "
                        f"and it has {self.n_layers or 'any number of'} layers")

    def experiment(self, id: str) -> Experiment:
        """The experiment with this id; an unknown id is an error that lists the available ones."""
        if id not in self.experiments:
            raise PersonaAxisError(f"unknown capping experiment {id!r}: choose one of {', '.join(self.experiments)}")
        return self.experiments[id]

    def check_model(self, lm: ModelShape) -> None:
        """Refuse a model whose layer count, hidden size or source hash differ from the config's."""
        top = max((c.layer for e in self.experiments.values() for c in e.caps), default=-1)
        fits = (self.n_layers in (0, lm.n_layers) and top < lm.n_layers and self.hidden_size == lm.hidden_size
                and not (self.model_hash and lm.source_hash and self.model_hash != lm.source_hash))
        if not fits:
            raise PersonaAxisError(
                f"capping config was made for {_describe(self.model, self.n_layers, self.hidden_size, self.model_hash)};"
                f" this model is {_describe(lm.name, lm.n_layers, lm.hidden_size, lm.source_hash)}: "
                "calibrate a config for this model"
            )


def _describe(name: str, n_layers: int, hidden: int, source_hash: str) -> str:
    """'name ([layers, hidden], hash 0123456789ab)' for error messages; 0 layers is shown as '?'."""
    digest = f", hash {source_hash[:12]}" if source_hash else ""
    return f"{name or 'an unknown model'} ([{n_layers or '?'}, {hidden}]{digest})"


def experiment_id(start: int, stop: int, floor: float | str) -> str:
    """"layers_<start>:<stop>-p<percentile>" (or "-mean" for DEFAULT_MEAN) for the half-open layer range [start, stop)."""
    if floor == DEFAULT_MEAN:
        return f"layers_{start}:{stop}-{DEFAULT_MEAN}"
    return f"layers_{start}:{stop}-p{float(floor)!r}"


def parse_experiment_id(s: str) -> tuple[int, int, float | str]:
    """Inverse of `experiment_id`: (start, stop, percentile or DEFAULT_MEAN)."""
    match = _ID_PATTERN.fullmatch(s)
    if match:
        start, stop = int(match[1]), int(match[2])
        floor: float | str = DEFAULT_MEAN if match[4] else float(match[3])
        if start < stop and (floor == DEFAULT_MEAN or 0 < float(floor) < 1):
            return start, stop, floor
    raise PersonaAxisError(f"bad experiment id {s!r}: expected layers_<start>:<stop>-p<percentile> with "
                           "start < stop and 0 < percentile < 1, e.g. layers_46:54-p0.25, or layers_<start>:<stop>-mean")


def parse_layer_block(s: str) -> range:
    """'A:B' -> range(A, B), a half-open block of layers with 0 <= A < B (e.g. '21:26')."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", s)
    if not match or int(match[1]) >= int(match[2]):
        raise PersonaAxisError(f"bad layer block {s!r}: expected A:B with 0 <= A < B (half-open), e.g. 21:26")
    return range(int(match[1]), int(match[2]))


def default_layer_block(n_layers: int) -> range:
    """The default capped block: a contiguous ~15 % of the layers starting at ~70 % depth.

    Rule: start = round(0.70 · n_layers), length = max(1, round(0.15 · n_layers)) (halves round
    up), clipped to the model. 64 layers → 45:55 (published: 46:54); 80 → 56:68 (published:
    56:72); 30 → 21:26; 3 → 2:3.
    """
    if n_layers < 1:
        raise PersonaAxisError(f"a model needs at least one layer, not {n_layers}")
    start = min(math.floor(0.70 * n_layers + 0.5), n_layers - 1)
    length = max(1, math.floor(0.15 * n_layers + 0.5))
    return range(start, min(start + length, n_layers))


def _vector_table(config: CappingConfig) -> tuple[dict[str, CapLayer], dict[str, list[str]]]:
    """Distinct cap axes by name ("layer_<i>", then "layer_<i>_<k>") and each experiment's names, cap by cap."""
    table: dict[str, CapLayer] = {}
    names: dict[str, list[str]] = {}
    for eid, experiment in config.experiments.items():
        names[eid] = []
        for cap in experiment.caps:
            same_layer = [n for n, c in table.items() if c.layer == cap.layer]
            name = next((n for n in same_layer if torch.equal(table[n].axis, cap.axis)), None)
            if name is None:
                name = f"layer_{cap.layer}" + (f"_{len(same_layer)}" if same_layer else "")
                table[name] = cap
            names[eid].append(name)
    return table, names


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def save_config(config: CappingConfig, path: str | Path) -> None:
    """Write `<stem>.safetensors` (unit axes [hidden]) and `<stem>.json`, each atomically."""
    stem = _stem(path)
    table, names = _vector_table(config)
    data = save_safetensors_bytes({n: c.axis.contiguous() for n, c in table.items()}, metadata={"format": FORMAT})
    document = {
        "format": FORMAT, "model": config.model, "model_hash": config.model_hash, "n_layers": config.n_layers,
        "hidden_size": config.hidden_size, "source": config.source, "population": config.population,
        "vectors_file": f"{stem.name}.safetensors", "vectors_sha256": hashlib.sha256(data).hexdigest(),
        "experiments": [{"id": eid, "caps": [{"layer": c.layer, "floor": c.floor, "vector": n, **c.stats}
                                             for c, n in zip(e.caps, names[eid])]}
                        for eid, e in config.experiments.items()],
    }
    atomic_write_bytes(Path(f"{stem}.safetensors"), data)
    atomic_write_bytes(Path(f"{stem}.json"), json.dumps(document, indent=2).encode())


def load_config(path: str | Path) -> CappingConfig:
    """Read a config written by `save_config`, given its stem or either file's path."""
    stem = _stem(path)
    json_path, vectors_path = Path(f"{stem}.json"), Path(f"{stem}.safetensors")
    if not json_path.exists() or not vectors_path.exists():
        raise PersonaAxisError(f"capping config not found: {stem}.json and {stem}.safetensors are both needed")
    data = vectors_path.read_bytes()
    try:
        doc = json.loads(json_path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
        if doc["vectors_sha256"] != hashlib.sha256(data).hexdigest():
            raise ValueError(f"{vectors_path.name} is not the vectors file written with it")
        vectors = load_safetensors_bytes(data)
        experiments = {e["id"]: Experiment(e["id"], [CapLayer(c["layer"], vectors[c["vector"]], c["floor"],
                                                              {k: float(c[k]) for k in CAP_STATS if k in c})
                                                     for c in e["caps"]]) for e in doc["experiments"]}
        fields = {k: doc[k] for k in ("model", "model_hash", "n_layers", "hidden_size", "source", "population")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PersonaAxisError(f"{json_path} is not a usable capping config ({exc}): save it again") from None
    return CappingConfig(**fields, experiments=experiments)


def export_torch_config(config: CappingConfig, path: str | Path) -> None:
    """Write the ceiling structure other tools read: vectors −â, caps −τ (torch.save, tensors and plain values)."""
    table, names = _vector_table(config)
    obj = {
        "vectors": {n: {"layer": c.layer, "vector": -c.axis} for n, c in table.items()},
        "experiments": [{"id": eid, "interventions": [{"vector": n, "cap": -c.floor}
                                                      for c, n in zip(e.caps, names[eid])]}
                        for eid, e in config.experiments.items()],
    }
    torch.save(obj, path)


def _foreign_vectors(obj: Any, where: str) -> dict[str, tuple[int, Tensor]]:
    """{name: (layer, v̂ [hidden])} from a foreign file's "vectors" table, validated."""
    if not (isinstance(obj, dict) and isinstance(obj.get("vectors"), dict) and isinstance(obj.get("experiments"), list)):
        raise PersonaAxisError(f"{where} is not a capping config: expected a dict with 'vectors' and 'experiments'")
    table = {}
    for name, entry in obj["vectors"].items():
        layer = entry.get("layer") if isinstance(entry, dict) else None
        vector = entry.get("vector") if isinstance(entry, dict) else None
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or not isinstance(vector, Tensor):
            raise PersonaAxisError(f"{where}: vector {name!r} needs an integer 'layer' >= 0 and a tensor 'vector'")
        table[str(name)] = (layer, _unit(vector, f"{where}: vector {name!r}"))
    sizes = sorted({v.shape[0] for _, v in table.values()})
    if len(sizes) != 1:
        raise PersonaAxisError(f"{where}: vectors have different sizes {sizes} (or there are none): "
                               "every vector must have the model's hidden size")
    return table


@dataclass(frozen=True)
class TorchImportSkips:
    """What `import_torch_config` left out, as the reference does: interventions without a 'cap' key
    ("<experiment id>/<vector name>"), and the ids of experiments that had no capped intervention at all."""

    interventions: tuple[str, ...]
    experiments: tuple[str, ...]


def _foreign_caps(entry: Any, table: dict[str, tuple[int, Tensor]], where: str
                  ) -> tuple[str, list[tuple[tuple[int, Tensor], float]], list[str]]:
    """(id, [((layer, v̂), cap)], ["<id>/<vector>" of each intervention without a cap]) of one foreign experiment."""
    try:
        eid, items = str(entry["id"]), entry["interventions"]
        capped = [i for i in items if "cap" in i]
        skipped = [f"{eid}/{i.get('vector', '?')}" for i in items if "cap" not in i]
        return eid, [(table[str(i["vector"])], float(i["cap"])) for i in capped], skipped
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PersonaAxisError(f"{where}: malformed experiment ({type(exc).__name__}: {exc}); each needs an "
                               "'id' and interventions naming a known vector with a numeric 'cap'") from None


def import_torch_config(path: str | Path, model: str = "", model_hash: str = ""
                        ) -> tuple[CappingConfig, TorchImportSkips]:
    """Read the foreign ceiling structure (torch.load with weights_only=True): (v, cap) → CapLayer(−v̂, −cap).

    Interventions without a 'cap' key are skipped, and an experiment left with none is dropped; both are
    reported in the returned TorchImportSkips.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, missing or truncated file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PersonaAxisError(f"cannot read {path} as a tensors-only torch file: {reason}") from None
    table = _foreign_vectors(obj, str(path))
    experiments: dict[str, Experiment] = {}
    skipped: list[str] = []
    dropped: list[str] = []
    for entry in obj["experiments"]:
        eid, caps, left_out = _foreign_caps(entry, table, str(path))
        if eid in experiments or eid in dropped:
            raise PersonaAxisError(f"{path}: experiment id {eid!r} appears twice; ids must be unique")
        skipped += left_out
        if caps:
            experiments[eid] = Experiment(eid, [CapLayer(layer, -v, -cap) for (layer, v), cap in caps])
        else:
            dropped.append(eid)
    hidden = next(iter(table.values()))[1].shape[0]
    config = CappingConfig(model, model_hash, 0, hidden, str(path), "unknown", experiments)
    return config, TorchImportSkips(tuple(skipped), tuple(dropped))
