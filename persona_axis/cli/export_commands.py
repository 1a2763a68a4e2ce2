"""`persona-axis export`: the axis as a llama.cpp control vector (GGUF) or the reference implementation's `.pt`."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> None:
    from persona_axis.axis import load_axis
    from persona_axis.control.export import export_gguf, export_reference_pt, parse_layers
    from persona_axis.errors import PersonaAxisError

    axis = load_axis(args.axis)
    if args.format == "pt":
        if args.coefficient is not None or args.layers is not None:
            raise PersonaAxisError("--coefficient and --layers are for --format gguf: the .pt holds the whole axis as it is")
        export_reference_pt(axis, args.out)
        print(f"wrote {args.out}: axis [{axis.n_layers}, {axis.hidden_size}] float32 (torch tensor)")
        return
    layers = parse_layers(args.layers or str(axis.layer_or_middle(None)), axis.n_layers)
    coefficient = 1.0 if args.coefficient is None else args.coefficient
    export_gguf(axis, args.out, coefficient, layers)
    print(f"wrote {args.out}: control vector, {coefficient:g} × axis at layers {layers.start}-{layers.stop - 1} "
          f"(tensors direction.{layers.start}..direction.{layers.stop - 1})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser("export", help="write the axis for other runtimes: a llama.cpp control vector (GGUF, adds "
                                           "the axis; llama.cpp cannot cap) or the reference implementation's .pt")
    export.add_argument("axis", metavar="RUN_DIR_OR_AXIS",
                        help="a run directory, an axis file (.safetensors or .pt) or a built-in axis (smollm2)")
    export.add_argument("--format", choices=("gguf", "pt"), required=True,
                        help="gguf: llama.cpp control vector (llama-cli --control-vector); pt: torch tensor [layers, hidden]")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--coefficient", type=float,
                        help="gguf: multiplies the axis (default 1: the axis as computed). The axis points toward the "
                             "Assistant: a positive coefficient pushes replies toward the Assistant, a negative one "
                             "away from it, toward role-play")
    export.add_argument("--layers", metavar="A-B",
                        help="gguf: layers to steer, inclusive, our indices = llama.cpp's (layer L is written as "
                             "direction.L; 1..layers-1, layer 0 is out of llama.cpp's reach; default: the middle layer). "
                             "The additions add up over layers: lower the coefficient when steering many")
    export.set_defaults(func=cmd_export)
