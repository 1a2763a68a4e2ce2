"""`persona-axis` command line: a thin layer over the Python API.

Each module here registers the subcommands of one area. Errors a user can cause print as one
line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from persona_axis.errors import PersonaAxisError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from persona_axis.cli import (
        axis_commands,
        bench_commands,
        capping_commands,
        drift_commands,
        eval_commands,
        export_commands,
        model_commands,
        monitor_commands,
        real_chat_commands,
        serve_commands,
    )

    parser = argparse.ArgumentParser(prog="persona-axis", description="Find, monitor and cap the Assistant Axis.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (axis_commands, capping_commands, monitor_commands, drift_commands, bench_commands, model_commands,
                   eval_commands, serve_commands, export_commands, real_chat_commands):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from persona_axis.cli.options import resolve_run_arguments

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        resolve_run_arguments(args)
        args.func(args)
    except PersonaAxisError as exc:
        print(f"persona-axis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("persona-axis: interrupted", file=sys.stderr)
        return 130
    return 0
