"""Blind harm labels for an eval run's replies: draw the sample, then score the run's judge against the labels.

    .venv/bin/python docs/judge-labels/harm_sample.py draw RUN OUT_DIR [--items 100] [--samples 1] [--seed 4]
    (label OUT_DIR/to-label-a.jsonl and -b.jsonl by reading: {"row", "harmful", "refused", "note"} per row,
     written to OUT_DIR/labels-a.jsonl and -b.jsonl)
    .venv/bin/python docs/judge-labels/harm_sample.py score RUN OUT_DIR --out FILE --labelled-by "WHO, HOW, WHEN"

draw: `--items` persona-jailbreak and plain items drawn at random (seeded) from the run's set, each with the
reply of the uncapped condition and of the run's first other condition if it has one, so the labels are paired, for
each of the item's first `--samples` sampled replies (a run with `samples` > 1, e.g. `--preset reference`); the rows are
shuffled (seeded) so that a reader sees neither the condition nor the pairing, and the files to label hold only
the row number, the request and the reply. OUT_DIR/key.json keeps what the reader does not see.
score: joins the labels with the key, the run's stored verdicts (its first harm judge) and the refusal cue;
prints the judge's agreement with the labels and each condition's harm under both; writes FILE, one JSON line
per row with the label, the condition and the judge's verdict.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from persona_axis.evals.stats import mcnemar_exact, wilson_interval
from persona_axis.judges.offline import REFUSAL
from persona_axis.store import RunStore

UNCAPPED = "uncapped"


def draw(run: Path, out: Path, n_items: int, n_samples: int, seed: int) -> None:
    store = RunStore(run)
    items = {r["id"]: r for r in store.records("evalset")}
    replies = {(r["condition"], r["item"], r.get("sample", 0)): r["text"] for r in store.records("replies")
               if r.get("sample", 0) < n_samples}
    conditions = (UNCAPPED, *sorted({c for c, _, _ in replies} - {UNCAPPED})[:1])
    rng = random.Random(seed)
    pool = sorted(i for i, item in items.items() if item["kind"] in ("persona_jailbreak", "plain_harmful"))
    rows = [{"item": i, "condition": c, "sample": k, "request": items[i]["request"], "response": replies[(c, i, k)]}
            for i in rng.sample(pool, n_items) for c in conditions for k in range(n_samples)]
    rng.shuffle(rows)
    for k, row in enumerate(rows):
        row["row"] = k
    out.mkdir(parents=True, exist_ok=True)
    (out / "key.json").write_text(json.dumps(rows), encoding="utf-8")
    half = len(rows) // 2
    for part, chunk in (("a", rows[:half]), ("b", rows[half:])):
        (out / f"to-label-{part}.jsonl").write_text("".join(
            json.dumps({k: r[k] for k in ("row", "request", "response")}, ensure_ascii=False) + "\n" for r in chunk),
            encoding="utf-8")


def score(run: Path, out: Path, dest: Path, labelled_by: str) -> None:
    store = RunStore(run)
    key = {r["row"]: r for r in json.loads((out / "key.json").read_text(encoding="utf-8"))}
    labels = {x["row"]: x for part in "ab" for x in map(json.loads, (out / f"labels-{part}.jsonl").open())}
    if sorted(labels) != sorted(key):
        raise SystemExit(f"labels cover {len(labels)} rows, the sample has {len(key)}")
    verdicts = [v for v in store.records("verdicts") if "harmful" in v]
    judge = verdicts[0]["judge"]  # the harm judge (the refusal-cue verdicts of benign items hold no "harmful")
    judged = {(v["condition"], v["item"], v.get("sample", 0)): v["harmful"] for v in verdicts if v["judge"] == judge}
    texts = {(r["condition"], r["item"], r.get("sample", 0)): r["text"] for r in store.records("replies")}
    rows = []
    for k in sorted(key):
        key[k].setdefault("sample", 0)  # samples drawn before --samples existed are each item's first
        unit = (key[k]["condition"], key[k]["item"], key[k]["sample"])
        rows.append({**key[k], **{f: labels[k][f] for f in ("harmful", "refused", "note")},
                     "labelled_by": labelled_by, "judge": judge, "judge_harmful": judged[unit],
                     "refusal_cue": bool(REFUSAL.search(texts[unit][:200]))})
    n = len(rows)
    agree = sum(bool(r["harmful"]) == bool(r["judge_harmful"]) for r in rows)
    print(f"{n} rows; labelled harmful {sum(r['harmful'] for r in rows)}, judged harmful "
          f"{sum(bool(r['judge_harmful']) for r in rows)}; agreement {agree}/{n} {wilson_interval(agree, n)}")
    print(f"labelled refused {sum(r['refused'] for r in rows)}, refusal cue {sum(r['refusal_cue'] for r in rows)}")
    for source in ("harmful", "judge_harmful"):
        by = {c: {(r["item"], r["sample"]): bool(r[source]) for r in rows if r["condition"] == c}
              for c in {r["condition"] for r in rows}}
        base = by.pop(UNCAPPED)
        print(f"{source}: {UNCAPPED} {sum(base.values())}/{len(base)}")
        for condition, values in by.items():
            items = sorted(base)
            test = mcnemar_exact([base[i] for i in items], [values[i] for i in items])
            print(f"{source}: {condition} {sum(values.values())}/{len(values)}, McNemar {test.only_base} vs "
                  f"{test.only_other}, p {test.p_value:.3f}")
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("draw", "score"))
    parser.add_argument("run", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1, help="draw: sampled replies per item and condition")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--out", type=Path, help="score: the labelled rows")
    parser.add_argument("--labelled-by", default="", help="score: who labelled, how and when (kept on every row)")
    args = parser.parse_args()
    if args.what == "draw":
        draw(args.run, args.out_dir, args.items, args.samples, args.seed)
    else:
        if args.out is None or not args.labelled_by:
            raise SystemExit("score needs --out FILE and --labelled-by")
        score(args.run, args.out_dir, args.out, args.labelled_by)


if __name__ == "__main__":
    main()
