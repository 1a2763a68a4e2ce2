"""The conditions of an eval run: what each one does to the model while it answers the eval set.

  uncapped          nothing (the baseline every other condition is paired with)
  cap:<experiment>  the caps of a capping-config experiment (floors on the axis projection)
  pc1:<experiment>  the same block and percentile, calibrated along the roles' PC1 instead of the axis
  steer:<COEF@L>    an addition of the axis at one layer (persona_axis.control.spec's --steer units)

A Condition holds plain values; `interventions()` builds fresh intervention objects each call, so
cap engagement counts start from zero for every batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.control.capping import CapLayer, load_config, parse_experiment_id
from persona_axis.decode.interventions import Addition, Cap, Intervention, Positions
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import ModelShape
from persona_axis.store import RunLayout, load_tensors

DIRECTIONS = ("axis", "pc1", "both")
UNCAPPED = "uncapped"


@dataclass(frozen=True, eq=False)
class Condition:
    """One condition: caps (layer, unit direction [hidden], floor) and/or one steering addition."""

    name: str
    caps: tuple[CapLayer, ...] = ()
    steer_vector: Tensor | None = None
    steer_coef: float = 0.0
    steer_layer: int = -1
    direction: str = "axis"
    steer_positions: Positions = "all"

    @property
    def layers(self) -> list[int]:
        """The layers this condition intervenes on, sorted."""
        return sorted({c.layer for c in self.caps} | ({self.steer_layer} if self.steer_vector is not None else set()))

    def interventions(self) -> dict[int, list[Intervention]]:
        """Fresh {layer: [intervention]}: caps track their engagement (share of generated tokens raised)."""
        out: dict[int, list[Intervention]] = {c.layer: [Cap(c.axis, c.floor, track=True)] for c in self.caps}
        if self.steer_vector is not None:
            out.setdefault(self.steer_layer, []).append(Addition(self.steer_vector, self.steer_coef,
                                                                 positions=self.steer_positions))
        return out

    def digest(self) -> str:
        """sha256 of everything the condition does (floors, directions, steering vector and coefficient)."""
        h = hashlib.sha256(json.dumps([self.name, self.direction, self.steer_coef, self.steer_layer,
                                       [(c.layer, c.floor) for c in self.caps]]).encode())
        for tensor in [c.axis for c in self.caps] + ([self.steer_vector] if self.steer_vector is not None else []):
            h.update(tensor.float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "direction": self.direction, "layers": self.layers,
                "floors": {str(c.layer): c.floor for c in self.caps}}


def pc1_axis(run_dir: str | Path, axis: Axis) -> Axis:
    """PC1 of the run's role vectors at every layer, signed toward the axis -> Axis [layers, hidden] (unit rows).

    Role vectors are the run's vector file's tensors (RunLayout.vectors) other than "default" ([layers, hidden] each); PC1
    is persona_axis.build.persona_space.pca's first component per layer; its sign is flipped where
    PC1 · axis < 0, so a higher PC1 projection is more Assistant-like, as on the axis.
    """
    from persona_axis.build.persona_space import pca

    path = RunLayout(run_dir).require_vectors("--direction pc1")
    tensors, _ = load_tensors(path)
    role_tensors = [t.float() for name, t in sorted(tensors.items()) if name != "default"]
    if not role_tensors:
        raise PersonaAxisError(f"{path} holds no role vectors (a built-in axis ships only the default vector): "
                               "give the run directory the axis came from")
    roles = torch.stack(role_tensors)  # [roles, L, H]
    if tuple(roles.shape[1:]) != (axis.n_layers, axis.hidden_size):
        raise PersonaAxisError(f"{path} role vectors {tuple(roles.shape[1:])} do not fit the axis: use its own run")
    rows = []
    for layer in range(axis.n_layers):
        pc1 = pca(roles[:, layer]).components[0].float()
        rows.append(pc1 if float(pc1 @ axis.vectors[layer]) >= 0 else -pc1)
    return Axis(torch.stack(rows), {**axis.metadata, "direction": "pc1 of role vectors, signed toward the axis"})


def _pc1_caps(run_dir: Path, axis: Axis, experiment: str, population: str) -> tuple[CapLayer, ...]:
    """The caps of `experiment`'s block and percentile, calibrated along PC1 (persona_axis.control.calibration.calibrate)."""
    from persona_axis.control.calibration import POPULATIONS, calibrate

    start, stop, percentile = parse_experiment_id(experiment)
    config = calibrate(run_dir, range(start, stop), [percentile],
                       population if population in POPULATIONS else "roles+traits", axis=pc1_axis(run_dir, axis))
    return tuple(next(iter(config.experiments.values())).caps)


def plan_conditions(lm: ModelShape, axis: Axis, axis_path: str | Path, config: str | Path | None = None,
                    caps: Sequence[str] = (), steers: Sequence[str] = (), direction: str = "axis") -> list[Condition]:
    """Every condition of a run, validated against the model before anything is generated or written.

    config: a capping config (default <axis run>/capping); direction: "axis" (caps as calibrated),
    "pc1" (their PC1 counterparts instead) or "both". Unknown experiments, a config made for
    another model, malformed steering specs and duplicates are one-line errors.
    """
    from persona_axis.control.spec import SpecContext, build_interventions, steer_item

    axis.check_model(lm.n_layers, lm.hidden_size, lm.name)
    if direction not in DIRECTIONS:
        raise PersonaAxisError(f"unknown --direction {direction!r}: use {', '.join(DIRECTIONS)}")
    run_dir = Path(axis_path) if Path(axis_path).is_dir() else None
    if direction != "axis" and not caps:
        raise PersonaAxisError(f"--direction {direction} applies to caps: name at least one --cap EXPERIMENT")
    conditions = [Condition(UNCAPPED)]
    if caps:
        path = config or (RunLayout(run_dir).capping if run_dir is not None else None)
        if path is None:
            raise PersonaAxisError("--cap needs a capping config: pass --config or give --axis as a run directory")
        loaded = load_config(path)
        loaded.check_model(lm)
        for name in caps:
            experiment = loaded.experiment(name)
            if direction in ("axis", "both"):
                conditions.append(Condition(f"cap:{name}", tuple(experiment.caps)))
            if direction in ("pc1", "both"):
                if run_dir is None:
                    raise PersonaAxisError("--direction pc1 needs --axis to be a run directory (its role vectors)")
                conditions.append(Condition(f"pc1:{name}", _pc1_caps(run_dir, axis, name, loaded.population),
                                            direction="pc1"))
    spec = SpecContext(lm, axis, run_dir)
    for text in steers:
        [(layer, [addition])] = build_interventions(spec, [steer_item(text)]).items()
        assert isinstance(addition, Addition)
        conditions.append(Condition(f"steer:{text.strip()}", steer_vector=addition.vector, steer_coef=addition.coef,
                                    steer_layer=layer, steer_positions=addition.positions))
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise PersonaAxisError(f"conditions repeat ({', '.join(names)}): give each --cap and --steer once")
    return conditions
