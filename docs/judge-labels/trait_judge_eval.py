"""Agreement of the offline trait judge with a labelled trait sample (judge-eval scores items as roles, so it cannot).

Usage: .venv/bin/python docs/judge-labels/trait_judge_eval.py docs/judge-labels/qwen-trait-sample.jsonl [FOLD]
Builds the judge as the pipeline does, make_judge("offline", traits=catalog.traits), scores each row as a
kind="trait" item and prints one JSON object with the fields of `persona-axis judge-eval --json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from persona_axis.catalog import load_catalog
from persona_axis.judges import make_judge
from persona_axis.judges.agreement import agreement
from persona_axis.judges.base import JudgeItem


def main() -> None:
    path, fold = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if fold is None or r["fold"] == fold]
    judge = make_judge("offline", traits=load_catalog().traits)
    items = [JudgeItem(r["role"], r["description"], r["question"], r["response"], kind="trait") for r in rows]
    verdicts = judge.score(items)
    print(json.dumps({"labels": path, "fold": fold, "judge": judge.id,
                      **agreement([r["label"] for r in rows], [v.score for v in verdicts])}))


if __name__ == "__main__":
    main()
