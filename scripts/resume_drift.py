"""How much a resumed `btrm score` differs from an uninterrupted one (issue 18, item 12), fp32 and bf16 on CPU.

    python scripts/resume_drift.py [--pairs 200 --chunk-rows 64 --resume-at 70,133 --dtypes fp32,bf16]

Writes --pairs close preference pairs (the rejected answer is the chosen one with one word changed, so the two
rewards are near each other and a small error can flip which is preferred), scores them with the real CLI
(`python -m btrm.cli score`, a 4 x 256 random-init Llama reward model on CPU), then for each --resume-at row cuts
the output there, as a kill would, and resumes it. Reports, against the uninterrupted output: rows whose rewards
differ at all, the largest |difference|, and pairs whose preferred side flipped. Run it with PYTHONPATH pointing at
another checkout's src to measure that code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from bench_score import build_model, make_conversations


def score(model: str, inp: str, out: str, dtype: str, chunk_rows: int) -> None:
    p = subprocess.run([sys.executable, "-m", "btrm.cli", "score", "--model", model, "--input", inp, "--output", out,
                        "--dtype", dtype, "--device", "cpu", "--chunk-rows", str(chunk_rows)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"btrm score failed ({p.returncode}): {p.stderr[-2000:]}")


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--chunk-rows", type=int, default=64)
    ap.add_argument("--resume-at", default="70,133", help="rows already in the output when the run resumes")
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as work:
        model = build_model(work, 256, 4)
        inp = os.path.join(work, "pairs.jsonl")
        with open(inp, "w") as f:
            for conv in make_conversations(args.pairs, seed=2):
                words = conv[1]["content"].split()
                i = rng.integers(len(words))
                words[i] = "river" if words[i] != "river" else "owl"
                rejected = [conv[0], {"role": "assistant", "content": " ".join(words)}]
                f.write(json.dumps({"chosen": conv, "rejected": rejected}) + "\n")
        print("| dtype | resumed at row | rows differing | max abs diff | max diff / |reward| | preference flips |")
        print("|---|---:|---:|---:|---:|---:|")
        for dtype in args.dtypes.split(","):
            full = os.path.join(work, f"full-{dtype}.jsonl")
            score(model, inp, full, dtype, args.chunk_rows)
            want = read(full)
            for k in map(int, args.resume_at.split(",")):
                cut = os.path.join(work, f"cut-{dtype}-{k}.jsonl")
                with open(full) as f, open(cut, "w") as g:
                    g.writelines(f.readlines()[:k])
                score(model, inp, cut, dtype, args.chunk_rows)
                got = read(cut)
                assert [r["row"] for r in got] == [r["row"] for r in want]
                a = np.array([[r["chosen"], r["rejected"]] for r in want])
                b = np.array([[r["chosen"], r["rejected"]] for r in got])
                diff = np.abs(a - b)
                flips = sum(x["preferred"] != y["preferred"] for x, y in zip(want, got))
                print(f"| {dtype} | {k} | {int((diff.max(axis=1) > 0).sum())} / {len(want)} | {diff.max():.3g} "
                      f"| {(diff / np.maximum(np.abs(a), 1e-12)).max():.3g} | {flips} |", flush=True)


if __name__ == "__main__":
    main()
