"""Options several subcommands share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persona_axis.build.executors import Executor
    from persona_axis.model.loading import LoadedModel

from persona_axis.builtin_axes import BUILTIN_AXES
from persona_axis.model.int8 import FAST_PATHS


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="'default', a packaged model, a .gguf file, a model directory or a hub id "
                                   "(default: the model the run given as --axis or RUN was made with, else 'default')")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16 or float16")
    p.add_argument("--fast-path", default="exact", choices=("auto", *FAST_PATHS),
                   help="exact (default): the model as loaded; int8: weight-only int8 linears on CPU, faster "
                        "decoding with a bounded loss (docs/fast-path.md); auto: int8 on CPU, else exact")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--device-map", help="auto: shard a model larger than one GPU over the GPUs, then CPU (accelerate)")


def portable_model_spec(spec: str) -> str:
    """A --model spec as a run records it: a path made absolute; "default", a packaged model's name (which
    load_model reads as such before any path) and a hub id as given."""
    from persona_axis.model.sources import PACKAGED_MODELS

    if spec == "default" or spec in PACKAGED_MODELS or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def resolve_run_arguments(args: argparse.Namespace) -> None:
    """Fill in what a run names: a built-in --axis becomes its directory, and a missing --model the spec
    the run given as --axis (or RUN, or `run --out`) recorded, else "default"."""
    from persona_axis.build.pipeline import recorded_model_spec
    from persona_axis.builtin_axes import resolve_axis

    if getattr(args, "axis", None):
        args.axis = resolve_axis(args.axis, getattr(args, "model", None))
    if hasattr(args, "model") and args.model is None:
        runs = [getattr(args, "axis", None), getattr(args, "run", None),
                args.out if args.command == "run" else None]
        args.model = next((spec for run in runs if run and (spec := recorded_model_spec(run))), "default")


def load_model_from(args: argparse.Namespace, progress: bool = True) -> LoadedModel:
    """The model that --model, --dtype, --fast-path, --device and --device-map name."""
    from persona_axis.model.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                      fast_path=args.fast_path, progress=progress)


def axis_options(p: argparse.ArgumentParser, required: bool = True, without: str = "") -> None:
    """--model and its options, and --axis (`without`: what the command does when --axis is optional and absent)."""
    model_options(p)
    builtin = ", ".join(f"{a.name} (for --model {a.model_specs[0]})" for a in BUILTIN_AXES.values())
    p.add_argument("--axis", required=required, help="a run directory, an axis file (.safetensors or torch file) or "
                                                       f"a built-in axis: {builtin}" + without)


def intervention_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="capping config for --cap (default: <run>/capping.json when --axis is a run "
                                    "directory); an error without --cap")
    p.add_argument("--cap", metavar="EXPERIMENT", help="apply this capping experiment, e.g. layers_21:26-p0.25 "
                                                      "(floors on the axis projection; append /last or /reply to "
                                                      "cap only those positions)")
    p.add_argument("--steer", action="append", default=[], metavar="COEF@LAYER",
                   help="add COEF x axis at LAYER (repeatable; COEF in units of the axis length), or with "
                        "COEFn@LAYER (e.g. -0.5n@15) COEF x the norm of the run's mean default-Assistant activation "
                        "at LAYER x the unit axis (needs --axis to be a run directory), or with COEFr@LAYER (e.g. "
                        "0.1r@15) COEF x the real-chat activation norm at LAYER x the unit axis (needs the run's "
                        "real_chat.json: `persona-axis real-chat RUN`); write a negative COEF "
                        "as --steer=-0.5n@15; append /last (the prompt's last token and the reply) or /reply "
                        "(the reply's tokens only)")
    p.add_argument("--ablate", action="append", default=[], metavar="LAYER[=VALUE]",
                   help="set the axis component at LAYER to VALUE (default 0; 'default': the run's mean "
                        "default-Assistant projection, a mean ablation); repeatable; /last or /reply as for --steer")


def judge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="offline", help="offline (default), offline-learned (logistic regression "
                   "on the labelled replies; role items only, traits keep the offline rules) or openai")
    p.add_argument("--judge-url", help="base URL of an OpenAI-compatible API (openai judge)")
    p.add_argument("--judge-model", help="model name for the openai judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")


def number_list(value: str) -> list[float]:
    return [float(v) for v in value.replace(",", " ").split()]


def print_json(obj: Any) -> None:
    print(json.dumps(obj))


def executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local (this process, default) or ray (actors on a Ray cluster; needs the ray extra)")
    p.add_argument("--ray-address", help="ray: auto (the cluster this machine joined), HOST:PORT, or unset to start a "
                                        "local Ray (or use $RAY_ADDRESS)")
    p.add_argument("--actors", type=int, default=1, help="ray: actors, each holding one copy of the model")
    p.add_argument("--threads-per-actor", type=int, default=1, help="ray: CPU threads (and Ray CPUs) per actor")
    p.add_argument("--gpus-per-actor", type=float, help="ray: GPUs per actor (default: 1 where the cluster has GPUs)")


@contextmanager
def executor_from(args: argparse.Namespace, progress: bool = True, pass_env: Sequence[str] = ()) -> Iterator[Executor]:
    """The executor --executor names: the local one on the model loaded here, or a started Ray executor
    whose actors load the model (stopped on exit) and see this process's variables named in `pass_env`."""
    import os

    from persona_axis.build.executors import LocalExecutor

    if args.executor == "local":
        yield LocalExecutor(load_model_from(args, progress=progress))
        return
    from persona_axis.build.ray_executor import ModelSpec, RayExecutor

    model = ModelSpec(args.model, args.dtype, args.device, args.device_map, args.fast_path)
    with RayExecutor(model, actors=args.actors, threads_per_actor=args.threads_per_actor,
                     gpus_per_actor=args.gpus_per_actor, address=args.ray_address,
                     env_vars={name: os.environ[name] for name in pass_env if name in os.environ}) as executor:
        yield executor
