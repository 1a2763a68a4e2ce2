"""One way to ask for interventions, from every source: CLI strings, request JSON, eval conditions.

Every source becomes request items — {"kind": name, ...} dicts — and `build_interventions` turns
items into {layer: [intervention, ...]} through each kind's `from_request` (decode/interventions.py). The
built-in kinds and their fields:

  {"kind": "steer", "layer": L, "coef": C, "units": "axis" | "norm" | "real"}   add C × the axis row at L; with
      "norm", C × the norm of the run's mean default-Assistant activation at L × the unit axis; with "real",
      C × the mean per-token activation norm at L of real conversations (the run's real_chat.json) × the unit axis
  {"kind": "ablate", "layer": L, "value": V | "default"}   set the axis component at L to V (default 0), or
      to the default-Assistant mean's projection (a mean ablation)
  {"kind": "cap", "experiment": ID}   the caps of a capping-config experiment (floors on the projection)
  {"kind": "cap", "layer": L, "floor": F | "default"}   one floor on the axis at L

each with an optional "positions": "all" (default), "last" or "reply" (decode/interventions.py says which tokens).
On the command line: `--steer COEF@LAYER`, `COEFn@LAYER` (norm units) or `COEFr@LAYER` (real-chat norm units),
`--ablate LAYER[=VALUE|default]`,
`--cap EXPERIMENT`; any of them may end in `/POSITIONS`, e.g. `--steer=-0.5n@15/last`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from persona_axis.axis import Axis
from persona_axis.control.capping import CappingConfig, load_config
from persona_axis.decode.interventions import KINDS, Intervention, Item, layer_lists
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import ModelShape
from persona_axis.store import RunLayout, load_tensors

_NUMBER = r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?"
_STEER = re.compile(rf"\s*({_NUMBER})([nr]?)\s*@\s*(\d+)\s*")
_STEER_UNITS = {"": "axis", "n": "norm", "r": "real"}
_ABLATE = re.compile(rf"\s*(\d+)\s*(?:=\s*({_NUMBER}|default)\s*)?")


def _split_positions(text: str) -> tuple[str, dict[str, str]]:
    """'SPEC/POSITIONS' -> ('SPEC', {"positions": POSITIONS}); 'SPEC' -> ('SPEC', {})."""
    spec, slash, positions = text.rpartition("/")
    return (spec, {"positions": positions.strip()}) if slash else (text, {})


def steer_item(text: str) -> dict[str, Any]:
    """'COEF@LAYER' (axis units, e.g. '-2@15'), 'COEFn@LAYER' (default-norm units, e.g. '-0.5n@15') or 'COEFr@LAYER'
    (real-chat norm units, e.g. '0.1r@15'), '/POSITIONS' optional."""
    spec, extra = _split_positions(text)
    match = _STEER.fullmatch(spec)
    if not match:
        raise PersonaAxisError(f"--steer expects COEF@LAYER (axis units, e.g. -2@15), COEFn@LAYER (units of the "
                               f"default activation norm, e.g. -0.5n@15) or COEFr@LAYER (units of the real-chat "
                               f"activation norm, e.g. 0.1r@15), optionally /last or /reply, not {text!r}")
    return {"kind": "steer", "layer": int(match[3]), "coef": float(match[1]), "units": _STEER_UNITS[match[2]], **extra}


def ablate_item(text: str) -> dict[str, Any]:
    """'LAYER' (axis component set to 0), 'LAYER=VALUE' or 'LAYER=default', '/POSITIONS' optional."""
    spec, extra = _split_positions(text)
    match = _ABLATE.fullmatch(spec)
    if not match:
        raise PersonaAxisError(f"--ablate expects LAYER, LAYER=VALUE or LAYER=default (e.g. 15=default), "
                               f"optionally /last or /reply, not {text!r}")
    value: float | str = 0.0 if match[2] is None else ("default" if match[2] == "default" else float(match[2]))
    return {"kind": "ablate", "layer": int(match[1]), "value": value, **extra}


def cap_item(text: str) -> dict[str, Any]:
    """'EXPERIMENT' (a capping-config experiment id, e.g. layers_21:26-p0.25), '/POSITIONS' optional."""
    spec, extra = _split_positions(text)
    return {"kind": "cap", "experiment": spec.strip(), **extra}


def cli_items(cap: str | None = None, steer: Sequence[str] = (), ablate: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The request items of the --cap, --steer and --ablate options, in that order."""
    return ([cap_item(cap)] if cap else []) + [steer_item(t) for t in steer] + [ablate_item(t) for t in ablate]


@dataclass
class SpecContext:
    """What items are built against: the model's shape and axis, the capping config (read from `config_path`,
    else <run_dir>/capping, when an item first needs it), the run's mean default-Assistant activation
    [layers, hidden] (given, or read from <run_dir>'s vectors when an item first needs it) and the real-chat
    activation norms [layers] (given, or read from <run_dir>'s real_chat.json when an item first needs them)."""

    model: ModelShape
    axis: Axis
    run_dir: Path | None = None
    config: CappingConfig | None = None
    config_path: Path | None = None
    defaults: Tensor | None = None
    real_norms: Tensor | None = None

    def __post_init__(self) -> None:
        self.axis.check_model(self.model.n_layers, self.model.hidden_size, self.model.name)

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def axis_vector(self, layer: int) -> Tensor:
        return self.axis.vectors[layer]

    def steering_vector(self, layer: int, units: str = "axis") -> Tensor:
        if units == "real":
            return steering_vector(self.axis, layer, self._real_norms())
        return steering_vector(self.axis, layer, self._defaults().norm(dim=-1) if units == "norm" else None)

    def default_projection(self, layer: int) -> float:
        return float(self._defaults()[layer].float() @ self.axis.unit(layer))

    def cap_floors(self, experiment: str) -> list[tuple[int, Tensor, float]]:
        return [(cap.layer, cap.axis, cap.floor) for cap in self.capping().experiment(experiment).caps]

    def capping(self) -> CappingConfig:
        """The capping config (loaded once, checked against the model)."""
        if self.config is None:
            path = self.config_path or (RunLayout(self.run_dir).capping if self.run_dir is not None else None)
            if path is None:
                raise PersonaAxisError("a cap needs a capping config: run `persona-axis calibrate` first, pass "
                                       "--config, or give --axis as a run directory that has one")
            self.config = load_config(path)
        self.config.check_model(self.model)
        return self.config

    def _defaults(self) -> Tensor:
        if self.defaults is None:
            if self.run_dir is None:
                raise PersonaAxisError("norm-relative steering (COEFn) and 'default' values read the run's mean "
                                       "default-Assistant activation: give --axis as a run directory")
            self.defaults = run_defaults(self.run_dir)
        if tuple(self.defaults.shape) != (self.axis.n_layers, self.axis.hidden_size):
            raise PersonaAxisError(f"the default activations have shape {tuple(self.defaults.shape)} but the axis "
                                   f"is {self.axis.n_layers} x {self.axis.hidden_size}: use the run the axis came from")
        return self.defaults

    def _real_norms(self) -> Tensor:
        if self.real_norms is None:
            if self.run_dir is None:
                raise PersonaAxisError("real-chat-relative steering (COEFr) reads the run's real_chat.json: give --axis "
                                       "as a run directory (`persona-axis real-chat RUN` writes the file)")
            from persona_axis.build.real_chat import real_chat_norms

            self.real_norms = real_chat_norms(self.run_dir)
        return self.real_norms


def run_defaults(run_dir: str | Path) -> Tensor:
    """The run's mean default-Assistant activation per layer -> [layers, hidden] float32 (vectors' "default")."""
    path = RunLayout(run_dir).require_vectors("norm-relative steering (COEFn) or a 'default' value")
    tensors, _ = load_tensors(path)
    if "default" not in tensors or tensors["default"].dim() != 2:
        raise PersonaAxisError(f"{path} holds no [layers, hidden] 'default' vector: re-run the vectors step")
    return tensors["default"].float()


def default_norms(run_dir: str | Path) -> Tensor:
    """Norm of the run's mean default-Assistant activation per layer -> [layers] float32 (the COEFn unit).

    The norm of the mean is a proxy for the typical activation norm (it is at most the mean of the norms).
    """
    return run_defaults(run_dir).norm(dim=-1)


def steering_vector(axis: Axis, layer: int, norms: Tensor | None = None) -> Tensor:
    """What coef = 1 adds at `layer` [hidden]: the axis row, or with norms [layers] (default_norms, or the
    real-chat ones) norms[layer] × the unit axis."""
    if norms is None:
        return axis.vectors[layer]
    if norms.shape != (axis.n_layers,):
        raise PersonaAxisError(f"activation norms have shape {tuple(norms.shape)} but the axis has "
                               f"{axis.n_layers} layers: use the run directory the axis came from")
    return float(norms[layer]) * axis.unit(layer)


def build_interventions(ctx: SpecContext, items: Iterable[Item]) -> dict[int, list[Intervention]]:
    """{layer: interventions in the order they act} for request items (see the module doc), validated."""
    out: dict[int, list[Intervention]] = {}
    for item in items:
        if not isinstance(item, Mapping):
            raise PersonaAxisError(f"an intervention must be an object with a 'kind', not {item!r}")
        kind = KINDS.get(str(item.get("kind")))
        if kind is None:
            raise PersonaAxisError(f"unknown intervention kind {item.get('kind')!r}: use {', '.join(sorted(KINDS))}")
        for layer, intervention in kind.from_request(item, ctx):
            out.setdefault(layer, []).append(intervention)
    return layer_lists(out)


def load_interventions(lm: ModelShape, axis: Axis, axis_path: str | Path, config: str | Path | None = None,
                       cap: str | None = None, steer: Sequence[str] = (),
                       ablate: Sequence[str] = ()) -> dict[int, list[Intervention]]:
    """Interventions from the command-line options shared by chat, generate and simulate.

    --config is only meaningful with --cap (an error otherwise); without --config the config is
    <axis run>/capping. Norm-relative steering and 'default' values read the --axis run directory.
    """
    if config is not None and cap is None:
        raise PersonaAxisError("--config is only used with --cap EXPERIMENT: name the experiment to apply")
    run_dir = Path(axis_path) if Path(axis_path).is_dir() else None
    ctx = SpecContext(lm, axis, run_dir, config_path=Path(config) if config is not None else None)
    return build_interventions(ctx, cli_items(cap, steer, ablate))


def describe_interventions(interventions: Mapping[int, Sequence[Intervention]]) -> str:
    """'capped', 'steered', 'capped+steered', 'ablated', ... or 'plain': the label of replies generated with them."""
    kinds = sorted({type(item) for items in interventions.values() for item in items}, key=lambda k: (k.rank, k.label))
    return "+".join(dict.fromkeys(kind.label for kind in kinds)) or "plain"
