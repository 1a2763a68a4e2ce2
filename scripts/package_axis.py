"""Package a finished run as a built-in axis under persona_axis/data/axes/NAME (a maintainer's step).

    .venv/bin/python scripts/package_axis.py runs/standard smollm2 --config runs/standard/capping \
        --config runs/standard/capping-mean --command "persona-axis run --preset standard --out runs/standard" \
        --wall "51 min"

The manifest's "builtin" section records the command, its wall time, the run's dtype, the CPU's model name
and bf16/AMX flags of the machine that packaged it (run this where the run was made), and today's date.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from persona_axis.builtin_axes import AXES_DIR, BUILTIN_AXES, package_run
from persona_axis.model.loading import cpu_flags
from persona_axis.store import RunStore


def cpu_description() -> str:
    """'<model name>, flags: ...' for the features that decide speed and dtype here."""
    names = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    features = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags())
    return f"{names[0] if names else 'unknown CPU'}, {len(names)} cores, flags: {' '.join(features) or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("name")
    parser.add_argument("--config", action="append", required=True, help="capping config stem (repeatable)")
    parser.add_argument("--command", required=True, help="the command that made the run")
    parser.add_argument("--wall", required=True, help="its wall time, as measured")
    parser.add_argument("--note", action="append", default=[], help="a further provenance line (repeatable)")
    args = parser.parse_args()
    manifest = RunStore(Path(args.run)).read_manifest()
    provenance = {"command": args.command, "wall_time": args.wall, "dtype": manifest["identity"]["dtype"],
                  "cpu": cpu_description(), "date": datetime.date.today().isoformat(),
                  "capping_configs": args.config, "notes": args.note}
    written = package_run(args.run, AXES_DIR / args.name, args.config, BUILTIN_AXES[args.name].model_specs[0],
                          provenance)
    print(json.dumps({"written": [str(p) for p in written], "bytes": sum(p.stat().st_size for p in written)}))


if __name__ == "__main__":
    main()
