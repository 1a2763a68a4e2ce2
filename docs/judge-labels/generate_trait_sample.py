"""Generate the unlabelled trait-expression sample that docs/judge-labels/smollm2-trait-sample.jsonl was labelled from.

Usage: .venv/bin/python docs/judge-labels/generate_trait_sample.py --model default --seed 1 \
           --out docs/judge-labels/smollm2-trait-sample.jsonl
Design (features only, never a judge's score): --rows distinct traits drawn at random (seeded) from
the built-in catalogue's traits; system-prompt indices 0-4 and the five question categories dealt
out evenly (each row a random question of its category); max_new_tokens 64; fold A/B dealt out in
a seeded, balanced way within each prompt index ("stratum" = "trait|p<index>") before generating.
Each reply samples from its own stream seeded with seed * 1_000_000 + 500_000 + its row number
(temperature 0.7, top_p 0.9, float32, capture off), as the pipeline samples trait rollouts.
Rows carry "role" (the trait's name, so the file has the fields `judge-eval` reads) and
"kind": "trait"; labels use the trait scale of persona_axis/judges/base.py (0 refuses, 1 absent,
2 partly expressed, 3 clearly expressed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from persona_axis.catalog import load_catalog
from persona_axis.decode.generate import generate
from persona_axis.model.loading import load_model

KINDS = ("moral", "personal", "philosophical", "practical", "technical")


def plan(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    catalog = load_catalog()
    by_kind = {kind: [q for q in catalog.questions if q.kind == kind] for kind in KINDS}
    traits = rng.sample(list(catalog.traits), args.rows)
    prompts = [k % 5 for k in range(args.rows)]
    rng.shuffle(prompts)
    kinds = [KINDS[k % 5] for k in range(args.rows)]
    rng.shuffle(kinds)
    rows = []
    for number, (trait, p, kind) in enumerate(zip(traits, prompts, kinds)):
        question = rng.choice(by_kind[kind])
        rows.append({"id": f"trait:{trait.name}|p{p}|{question.id}", "role": trait.name, "kind": "trait",
                     "group": "trait", "description": trait.description, "prompt_index": p,
                     "system_prompt": trait.prompts[p], "question_id": question.id, "question_kind": kind,
                     "question": question.text, "max_new_tokens": args.max_new_tokens, "stratum": f"trait|p{p}",
                     "seed": args.seed * 1_000_000 + 500_000 + number})
    for p in range(5):
        members = [r for r in rows if r["prompt_index"] == p]
        folds = ["A", "B"] * (len(members) // 2) + ([rng.choice("AB")] if len(members) % 2 else [])
        rng.shuffle(folds)
        for r, fold in zip(members, folds):
            r["fold"] = fold
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows = plan(args)
    lm = load_model(args.model, dtype="float32")
    settings = {"model": args.model, "dtype": "float32", "temperature": 0.7, "top_p": 0.9, "capture": False,
                "design": f"trait seed {args.seed}"}
    with Path(args.out).open("w", encoding="utf-8") as f:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            result = generate(
                lm, [[{"role": "system", "content": r["system_prompt"]}, {"role": "user", "content": r["question"]}]
                     for r in batch],
                max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, seed=[r["seed"] for r in batch],
                batch_size=args.batch_size, capture=False,
            )
            for row, text, finished in zip(batch, result.texts, result.finished):
                f.write(json.dumps({**row, **settings, "finished": finished, "response": text.strip(),
                                    "label": None, "note": ""}) + "\n")
            f.flush()
            print(f"{start + len(batch)}/{len(rows)} replies", flush=True)


if __name__ == "__main__":
    main()
