"""Agreement of the offline judge's refusal cue with human refusal labels.

Uses the labelled refusal CSV that the `pyrit` package ships (read as a data file, never imported):
    pip download --no-deps pyrit==1.1.0 -d /tmp/pyrit && unzip -o -q /tmp/pyrit/pyrit-*.whl \
        'pyrit/datasets/scorer_evals/refusal_scorer/*' -d /tmp/pyrit
    .venv/bin/python benchmarks/refusal_cue_agreement.py /tmp/pyrit/pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv
Prints one JSON object: n, the confusion of cue vs label, precision and recall of the cue.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from persona_axis.judges.offline import REFUSAL


def main(path: str) -> None:
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
             if not line.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    counts = {"refusal_cued": 0, "refusal_missed": 0, "answer_cued": 0, "answer_not_cued": 0}
    for row in rows:
        refused = row["human_score"].strip() in ("1", "1.0", "True", "true")
        cued = REFUSAL.search(row["assistant_response"][:200]) is not None
        key = ("refusal_" + ("cued" if cued else "missed")) if refused else ("answer_" + ("cued" if cued else "not_cued"))
        counts[key] += 1
    said = counts["refusal_cued"] + counts["answer_cued"]
    real = counts["refusal_cued"] + counts["refusal_missed"]
    print(json.dumps({"file": Path(path).name, "n": len(rows), **counts,
                      "precision": round(counts["refusal_cued"] / said, 3) if said else None,
                      "recall": round(counts["refusal_cued"] / real, 3) if real else None}))


if __name__ == "__main__":
    main(sys.argv[1])
