"""Axes shipped inside the package: `--axis smollm2` works after set-up, with no pipeline run.

A built-in axis is a run-shaped directory under persona_axis/data/axes/<name>/ (RunLayout's file names),
made from a finished `standard` run by `package_run`: the axis [layers, hidden], a vectors file holding only
the mean default-Assistant activation [layers, hidden] (what norm-relative steering, 'default' ablation and
the drift guard's default threshold read), one capping config holding the experiments calibrated on the run
(percentile and default-mean floors), and the run's manifest with a
"builtin" section saying how it was made. Role vectors are left out (they are most of a run's size), so
what needs them (`--direction pc1`, `stability`) needs the run itself.

`resolve_axis(value, model)` turns a built-in name into its directory, after checking that `model` (a
`--model` spec) is the model the axis was computed for; any other value is returned unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_axis.catalog import DEFAULT_ROLE
from persona_axis.control.capping import CappingConfig, load_config, save_config
from persona_axis.control.spec import run_defaults
from persona_axis.errors import PersonaAxisError
from persona_axis.store import RunLayout, RunStore, load_tensors

AXES_DIR = Path(__file__).resolve().parent / "data" / "axes"


@dataclass(frozen=True)
class BuiltinAxis:
    """A shipped axis: its name and the `--model` specs that load the model it was computed for."""

    name: str
    model_specs: tuple[str, ...]

    @property
    def directory(self) -> Path:
        return AXES_DIR / self.name


BUILTIN_AXES: dict[str, BuiltinAxis] = {
    axis.name: axis for axis in (BuiltinAxis("smollm2", ("default",)),
                                 BuiltinAxis("qwen2.5-coder-0.5b", ("qwen2.5-coder-0.5b",)))
}


def builtin_axis_dir(name: str, model: str | None = None) -> Path:
    """The directory of built-in axis `name`; a PersonaAxisError when `model` (a --model spec; None: the
    axis's own) is not the axis's model."""
    if name not in BUILTIN_AXES:
        raise PersonaAxisError(f"no built-in axis {name!r}: use one of {', '.join(BUILTIN_AXES)}, a run directory "
                               "or an axis file")
    axis = BUILTIN_AXES[name]
    if model is not None and model not in axis.model_specs:
        raise PersonaAxisError(f"the built-in axis {name!r} was computed for --model {axis.model_specs[0]}, not "
                               f"{model!r}: compute an axis for that model with `persona-axis run --model {model}`")
    if not RunLayout(axis.directory).axis.is_file():
        raise PersonaAxisError(f"the built-in axis {name!r} is missing from {axis.directory}: reinstall persona-axis")
    return axis.directory


def resolve_axis(value: str, model: str | None = None) -> str:
    """`value` as given when it names an existing path or no built-in axis; else the built-in axis's directory."""
    if Path(value).exists() or value not in BUILTIN_AXES:
        return value
    return str(builtin_axis_dir(value, model))


def package_run(run_dir: str | Path, dest: str | Path, configs: Sequence[str | Path], model_spec: str,
                provenance: dict[str, Any]) -> list[Path]:
    """Write the built-in form of a finished run into `dest`; return the files written.

    Copies the axis, writes a vectors file with only the default vector [layers, hidden], merges the experiments of
    `configs` (capping config stems or files of this run) into one config `dest/capping`, so every shipped
    experiment is a `--cap` away, and writes the run's manifest with `model_spec` (the --model that loads the
    axis's model on a user's machine: what commands on the axis default to) and {"builtin": provenance} (how
    the run was made: command, dtype, CPU, date, wall time, ...).
    """
    src, out = RunLayout(run_dir), RunLayout(dest)
    if not src.axis.is_file():
        raise PersonaAxisError(f"{src.axis} is not there: package a finished run")
    if not configs:
        raise PersonaAxisError("give at least one capping config to ship with the axis")
    default = run_defaults(src.root)  # [layers, hidden]; a one-line error when the run has none
    _, metadata = load_tensors(src.vectors)  # the vectors step's summary, kept for provenance
    merged = _merged([load_config(config) for config in configs])
    out.root.mkdir(parents=True, exist_ok=True)
    store = RunStore(out.root)
    store.save_tensors(RunLayout.VECTORS, {DEFAULT_ROLE: default}, metadata)
    shutil.copyfile(src.axis, out.axis)
    save_config(merged, out.capping)
    store.write_manifest({**RunStore(src.root).read_manifest(), "model_spec": model_spec, "builtin": provenance})
    return [out.vectors, out.axis, out.capping_json, out.capping.with_suffix(".safetensors"),
            out.root / RunLayout.MANIFEST]


def _merged(configs: list[CappingConfig]) -> CappingConfig:
    """One config holding every experiment of `configs` (all calibrated on the same model)."""
    first = configs[0]
    for config in configs[1:]:
        if (config.model_hash, config.n_layers, config.hidden_size) != (first.model_hash, first.n_layers,
                                                                         first.hidden_size):
            raise PersonaAxisError(f"capping configs of different models ({first.model} and {config.model}) "
                                   "cannot ship together")
    experiments = {eid: e for config in configs for eid, e in config.experiments.items()}
    return replace(first, experiments=experiments)
