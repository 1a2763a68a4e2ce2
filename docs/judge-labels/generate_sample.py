"""Generate the unlabelled role-play samples that the docs/judge-labels/*.jsonl files were labelled from.

Two designs:

--design first-prompt (the default; how docs/judge-labels/qwen-sample.jsonl was made)
    .venv/bin/python docs/judge-labels/generate_sample.py --model qwen2.5-coder-0.5b --out FILE
    Picks `per_group` roles at random (seeded) from each of the built-in catalogue's groups, asks
    each its first system prompt with one built-in question (drawn at random, seeded), generates one
    sampled reply per conversation without capturing activations (batches of --batch-size, batch k
    seeded with seed + its first row), and writes one JSON line per reply (fields of labelled.jsonl,
    "label" and "note" left empty; "fold" is a seeded, balanced A/B split within each role group).

--design stratified (docs/judge-labels/smollm2-sample-2.jsonl and qwen-sample-2.jsonl, seed 1)
    .venv/bin/python docs/judge-labels/generate_sample.py --design stratified --seed 1 \
        --model default --out docs/judge-labels/smollm2-sample-2.jsonl
    A design chosen from the conversations' features alone, never from any judge's score, so that
    the labels can later measure a judge without selection bias:
    - rows per role group from --group-rows (default adversarial 65, nonhuman 65, fantastical 45,
      creative 45, human 40, professional 40 = 300): the groups where a model most often refuses or
      steps out as an AI are oversampled;
    - within a group every system-prompt index 0-4 gets the same number of rows, each row a
      different (role, prompt) pair drawn at random, so a role rarely repeats a prompt;
    - question categories (moral, personal, philosophical, practical, technical) are dealt out
      evenly within each group, then one question of that category drawn at random; a conversation
      id already in labelled.jsonl or qwen-sample.jsonl is redrawn;
    - reply length: every third row of a group (after shuffling) gets max_new_tokens 128, the
      others 64 (--long-tokens / --short-tokens);
    - stratum = "<group>|t<max_new_tokens>"; fold A/B is dealt out in a seeded, balanced way within
      each stratum before any reply is generated;
    - --exclude FILE also redraws the ids of FILE (sample 3, seed 3, excluded both second samples' ids);
    - each reply samples from its own stream, seeded with seed * 1_000_000 + its row number
      (recorded as "seed"), so a row's reply does not depend on the batch it ran in.
    Sampling as the pipeline does: temperature 0.7, top_p 0.9, float32, capture off.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from persona_axis.catalog import load_catalog
from persona_axis.decode.generate import generate
from persona_axis.model.loading import load_model

HERE = Path(__file__).parent
OLD_SAMPLES = ("labelled.jsonl", "qwen-sample.jsonl")
GROUP_ROWS = "adversarial=65,nonhuman=65,fantastical=45,creative=45,human=40,professional=40"
KINDS = ("moral", "personal", "philosophical", "practical", "technical")


def first_prompt_rows(args: argparse.Namespace) -> list[dict]:
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
    return rows


def stratified_rows(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    catalog = load_catalog()
    taken = set()
    for path in [HERE / name for name in OLD_SAMPLES] + [Path(name) for name in args.exclude]:
        if path.exists():
            taken |= {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    by_kind = {kind: [q for q in catalog.questions if q.kind == kind] for kind in KINDS}
    sizes = {g: int(n) for g, n in (part.split("=") for part in args.group_rows.split(","))}
    rows = []
    for group, n_rows in sizes.items():
        members = [r for r in catalog.roles if r.group == group]
        if n_rows % 5:
            raise SystemExit(f"--group-rows: {group} needs a multiple of 5 rows (one share per prompt index)")
        picks = []
        for p in range(5):  # n_rows / 5 distinct roles for each prompt index
            chosen = rng.sample(members, n_rows // 5) if n_rows // 5 <= len(members) else \
                [rng.choice(members) for _ in range(n_rows // 5)]
            picks += [(role, p) for role in chosen]
        rng.shuffle(picks)
        kinds = [KINDS[k % 5] for k in range(n_rows)]
        rng.shuffle(kinds)
        lengths = [args.long_tokens if k % 3 == 2 else args.short_tokens for k in range(n_rows)]
        rng.shuffle(lengths)
        group_rows = []
        for (role, p), kind, length in zip(picks, kinds, lengths):
            while True:
                question = rng.choice(by_kind[kind])
                cid = f"{role.name}|p{p}|{question.id}"
                if cid not in taken:
                    break
            taken.add(cid)
            group_rows.append({"id": cid, "role": role.name, "group": group, "description": role.description,
                               "prompt_index": p, "system_prompt": role.prompts[p], "question_id": question.id,
                               "question_kind": kind, "question": question.text, "max_new_tokens": length,
                               "stratum": f"{group}|t{length}"})
        for stratum in sorted({r["stratum"] for r in group_rows}):  # balanced folds within each stratum
            members_s = [r for r in group_rows if r["stratum"] == stratum]
            folds = ["A", "B"] * (len(members_s) // 2) + ([rng.choice("AB")] if len(members_s) % 2 else [])
            rng.shuffle(folds)
            for r, fold in zip(members_s, folds):
                r["fold"] = fold
        rows += group_rows
    for number, row in enumerate(rows):
        row["seed"] = args.seed * 1_000_000 + number
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--design", choices=("first-prompt", "stratified"), default="first-prompt")
    parser.add_argument("--per-group", type=int, default=25, help="first-prompt design: roles per group")
    parser.add_argument("--group-rows", default=GROUP_ROWS, help="stratified design: rows per group")
    parser.add_argument("--short-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--exclude", action="append", default=[],
                        help="stratified design: also redraw conversation ids found in this JSONL file (repeatable)")
    parser.add_argument("--plan-only", action="store_true", help="print the design's rows and generate nothing")
    args = parser.parse_args()

    if args.design == "first-prompt":
        rows = first_prompt_rows(args)
    else:
        rows = stratified_rows(args)
    if args.plan_only:
        for row in rows:
            print(json.dumps(row))
        return
    lm = load_model(args.model, dtype="float32")
    out = Path(args.out)
    if args.design == "first-prompt":
        with out.open("w", encoding="utf-8") as f:
            for start in range(0, len(rows), args.batch_size):  # one batch at a time, written as it finishes
                batch = rows[start : start + args.batch_size]
                result = generate(
                    lm,
                    [[{"role": "system", "content": r["system_prompt"]}, {"role": "user", "content": r["question"]}]
                     for r in batch],
                    max_new_tokens=64, temperature=0.7, top_p=0.9, seed=args.seed + start,
                    batch_size=args.batch_size, capture=False,
                )
                for row, text in zip(batch, result.texts):
                    f.write(json.dumps({**row, "response": text.strip(), "label": None, "note": ""}) + "\n")
                f.flush()
                print(f"{start + len(batch)}/{len(rows)} replies", flush=True)
        return
    # stratified: resumable (rows already in --out are kept), batches of one length, written as they finish
    done = {}
    if out.exists():
        done = {json.loads(line)["id"]: line for line in out.read_text(encoding="utf-8").splitlines() if line.strip()}
    todo = [r for r in rows if r["id"] not in done]
    settings = {"model": args.model, "dtype": "float32", "temperature": 0.7, "top_p": 0.9, "capture": False,
                "design": f"stratified seed {args.seed}"}
    with out.open("a", encoding="utf-8") as f:
        for length in sorted({r["max_new_tokens"] for r in todo}):
            part = [r for r in todo if r["max_new_tokens"] == length]
            for start in range(0, len(part), args.batch_size):
                batch = part[start : start + args.batch_size]
                result = generate(
                    lm,
                    [[{"role": "system", "content": r["system_prompt"]}, {"role": "user", "content": r["question"]}]
                     for r in batch],
                    max_new_tokens=length, temperature=0.7, top_p=0.9, seed=[r["seed"] for r in batch],
                    batch_size=args.batch_size, capture=False,
                )
                for row, text, finished in zip(batch, result.texts, result.finished):
                    f.write(json.dumps({**row, **settings, "finished": finished, "response": text.strip(),
                                        "label": None, "note": ""}) + "\n")
                f.flush()
                print(f"t{length}: {start + len(batch)}/{len(part)} replies", flush=True)


if __name__ == "__main__":
    main()
