"""Options several subcommands share."""

from __future__ import annotations

import argparse
import json
from typing import Any

from persona_axis.fast_path import FAST_PATHS


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a .gguf file, a model directory or a hub id")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16 or float16")
    p.add_argument("--fast-path", default="exact", choices=("auto", *FAST_PATHS),
                   help="exact (default): the model as loaded; int8: weight-only int8 linears on CPU, faster "
                        "decoding with a bounded loss (docs/fast-path.md); auto: int8 on CPU, else exact")


def axis_options(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("--axis", required=True, help="a run directory or an axis file (.safetensors or torch file)")


def intervention_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="capping config for --cap (default: <run>/capping.json when --axis is a run "
                                    "directory); an error without --cap")
    p.add_argument("--cap", metavar="EXPERIMENT", help="apply this capping experiment, e.g. layers_21:25-p0.25")
    p.add_argument("--steer", action="append", default=[], metavar="COEF@LAYER",
                   help="add COEF x axis at LAYER (repeatable; COEF in units of the axis length), or with "
                        "COEFn@LAYER (e.g. -0.5n@15) COEF x the norm of the run's mean default-Assistant activation "
                        "at LAYER x the unit axis (needs --axis to be a run directory); write a negative COEF "
                        "as --steer=-0.5n@15")


def judge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="offline", help="offline (default) or openai")
    p.add_argument("--judge-url", help="base URL of an OpenAI-compatible API (openai judge)")
    p.add_argument("--judge-model", help="model name for the openai judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")


def number_list(value: str) -> list[float]:
    return [float(v) for v in value.replace(",", " ").split()]


def print_json(obj: Any) -> None:
    print(json.dumps(obj))
