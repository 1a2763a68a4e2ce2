"""Generate the unlabelled role-play sample that docs/judge-labels/qwen-sample.jsonl was labelled from.

Usage: .venv/bin/python docs/judge-labels/generate_sample.py --model qwen2.5-coder-0.5b --out FILE
Picks `per_group` roles at random (seeded) from each of the built-in catalogue's groups, asks
each its first system prompt with one built-in question (drawn at random, seeded), generates one
sampled reply per conversation without capturing activations (batches of --batch-size, batch k
seeded with seed + its first row), and writes one JSON line per reply
(fields of labelled.jsonl, "label" and "note" left empty; "fold" is a seeded, balanced A/B split
within each role group).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from persona_axis.catalog import load_catalog
from persona_axis.generation import generate
from persona_axis.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-group", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    catalog = load_catalog()
    groups = sorted({r.group for r in catalog.roles})
    rows = []
    for group in groups:
        members = rng.sample([r for r in catalog.roles if r.group == group], args.per_group)
        folds = ["A", "B"] * (args.per_group // 2 + 1)
        rng.shuffle(folds)
        for role, fold in zip(members, folds):
            question = rng.choice(catalog.questions)
            rows.append({"id": f"{role.name}|p0|{question.id}", "role": role.name, "group": group,
                         "description": role.description, "system_prompt": role.prompts[0],
                         "question": question.text, "fold": fold})
    lm = load_model(args.model, dtype="float32")
    with Path(args.out).open("w", encoding="utf-8") as f:
        for start in range(0, len(rows), args.batch_size):  # one batch at a time, written as it finishes
            batch = rows[start : start + args.batch_size]
            result = generate(
                lm,
                [[{"role": "system", "content": r["system_prompt"]}, {"role": "user", "content": r["question"]}]
                 for r in batch],
                max_new_tokens=64, temperature=0.7, top_p=0.9, seed=args.seed + start, batch_size=args.batch_size,
                capture=False,
            )
            for row, text in zip(batch, result.texts):
                f.write(json.dumps({**row, "response": text.strip(), "label": None, "note": ""}) + "\n")
            f.flush()
            print(f"{start + len(batch)}/{len(rows)} replies", flush=True)


if __name__ == "__main__":
    main()
