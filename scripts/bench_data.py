"""Tokenization throughput (cold and cached) and packing efficiency; `--scale`: peak memory at scale.

    python scripts/bench_data.py [--pairs 20000 --num-proc 1 2]
    python scripts/bench_data.py --scale 100000 1000000 --num-proc 1 2

--scale runs the streaming pipeline (`btrm data prepare`'s code) on that many synthetic long pairs, each run in a
fresh process, and reports peak RSS of the main process and of the largest tokenizing worker, pairs/s, the
figures per million pairs and a projection to 40M pairs.

Cold = validation + rendering + tokenization through datasets.map, written to the cache; cached = the second
run, which only memory-maps the cache. Packing: best-fit decreasing on long-tailed (lognormal) pair lengths at
16,384 tokens, and per-step plans dealt to ranks.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from btrm.config import DataConfig, SourceConfig
from btrm.data.dataset import prepare_data
from btrm.data.packing import pack_windows, packing_efficiency, plan_step
from btrm.modeling import ensure_pad_token
from btrm.tiny import build_tiny_model, lognormal_pair_sizes, write_preference_jsonl


def long_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Synthetic pairs of realistic length (a few hundred to a few thousand tokens)."""
    import json

    rnd = random.Random(seed)
    words = "the model reads a conversation and returns one number that says how good the answer is".split()
    with path.open("w") as f:
        for _ in range(n):
            p = " ".join(rnd.choices(words, k=int(rnd.lognormvariate(4.5, 0.8))))
            a = " ".join(rnd.choices(words, k=int(rnd.lognormvariate(5.0, 0.7)) + 1))
            b = " ".join(rnd.choices(words, k=int(rnd.lognormvariate(5.0, 0.7)) + 1))
            u = {"role": "user", "content": p}
            f.write(json.dumps({"chosen": [u, {"role": "assistant", "content": a}],
                                "rejected": [u, {"role": "assistant", "content": b + " no"}]}) + "\n")
    return path


def scale_one(n: int, nproc: int, work: Path) -> None:
    """One pipeline run in this (fresh) process; prints a JSON line with its figures."""
    import json
    import resource

    from transformers import AutoTokenizer

    from btrm.data.pipeline import prepare_cache

    tok = AutoTokenizer.from_pretrained(work / "model")
    ensure_pad_token(tok)
    cfg = DataConfig(sources=[SourceConfig(path=str(work / f"long-{n}.jsonl"))], num_proc=nproc, eval_fraction=0.01,
                     max_length=16384, max_tokens=32768)
    root = work / f"cache-{n}-{nproc}"
    t = time.perf_counter()
    prepare_cache(cfg, tok, 0, root)
    dt = time.perf_counter() - t
    rss = {who: resource.getrusage(r).ru_maxrss / 1024 for who, r in
           (("main", resource.RUSAGE_SELF), ("worker", resource.RUSAGE_CHILDREN))}
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(json.dumps({"pairs": n, "num_proc": nproc, "seconds": dt, "rss_main_mb": rss["main"],
                      "rss_worker_mb": rss["worker"], "cache_mb": size / 2**20}), flush=True)
    shutil.rmtree(root)


def scale(counts: list[int], nprocs: list[int], work: Path) -> None:
    import json
    import subprocess
    import sys

    build_tiny_model("llama3", work / "model")
    print("| pairs | num_proc | s | pairs/s | peak RSS main MB | peak RSS largest worker MB | cache MB | "
          "per 1M pairs: s / cache GB | 40M projection: h / cache GB |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for n in counts:
        f = long_rows(work / f"long-{n}.jsonl", n)
        for nproc in nprocs:
            out = subprocess.run([sys.executable, __file__, "--_one", str(n), str(nproc), str(work)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per_m_s, per_m_gb = r["seconds"] / n * 1e6, r["cache_mb"] / n * 1e6 / 1024
            print(f"| {n:,} | {nproc} | {r['seconds']:.0f} | {n / r['seconds']:,.0f} | {r['rss_main_mb']:,.0f} | "
                  f"{r['rss_worker_mb']:,.0f} | {r['cache_mb']:,.0f} | {per_m_s:,.0f} / {per_m_gb:.1f} | "
                  f"{per_m_s * 40 / 3600:,.1f} / {per_m_gb * 40:,.0f} |", flush=True)
        f.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scale", type=int, nargs="+", metavar="PAIRS", help="peak-memory runs of the streaming pipeline")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        return scale_one(int(args._one[0]), int(args._one[1]), Path(args._one[2]))
    if args.scale:
        with tempfile.TemporaryDirectory() as tmp:
            return scale(args.scale, args.num_proc, Path(tmp).resolve())
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_model("llama3", tmp / "model")
        tok = AutoTokenizer.from_pretrained(tmp / "model")
        ensure_pad_token(tok)
        sets = {"short (synthetic quickstart pairs)": write_preference_jsonl(tmp / "short.jsonl", args.pairs),
                "long (lognormal, ~100-3000 tokens)": long_rows(tmp / "long.jsonl", args.pairs // 4)}
        print("| data | num_proc | pairs | tokens | cold pairs/s | cold tokens/s | cached s |\n|---|---|---|---|---|---|---|")
        for name, f in sets.items():
            for nproc in args.num_proc:
                cache = tmp / f"cache-{nproc}"
                cfg = DataConfig(sources=[SourceConfig(path=str(f))], num_proc=nproc, cache_dir=str(cache),
                                 max_length=16384, max_tokens=32768)
                t = time.perf_counter()
                data = prepare_data(cfg, tok)
                cold = time.perf_counter() - t
                t = time.perf_counter()
                prepare_data(cfg, tok)
                warm = time.perf_counter() - t
                n, tokens = len(data.train), int(data.train.sizes.sum())
                print(f"| {name} | {nproc} | {n} | {tokens:,} | {n / cold:,.0f} | {tokens / cold:,.0f} | {warm:.2f} |")
                shutil.rmtree(cache)

    sizes = lognormal_pair_sizes(20480)
    print(f"\npacking {len(sizes)} long-tailed pairs (mean {np.mean(sizes):.0f}, p99 {np.percentile(sizes, 99):.0f} "
          "tokens) at max_tokens=16384")
    print("| method | fill (real tokens / capacity of used rows) | rank imbalance (max) | time s |\n|---|---|---|---|")
    for w in (256, 512, 2048):
        t = time.perf_counter()
        bins = pack_windows(sizes, 16384, w)
        print(f"| best-fit decreasing, window {w} | {packing_efficiency(bins, sizes, 16384):.4f} | - | "
              f"{time.perf_counter() - t:.2f} |")
    for batch, world in ((1024, 8), (2048, 8), (10240, 64)):
        t = time.perf_counter()
        tot = cap = 0
        worst = 0.0
        for s in range(0, len(sizes) - batch + 1, batch):
            sz = sizes[s:s + batch]
            plan = plan_step(sz, 16384, world)
            loads = [sum(sz[i] for b in r for i in b) for r in plan]
            worst = max(worst, (max(loads) - min(loads)) / max(loads))
            tot += sum(sz)
            cap += sum(1 for r in plan for b in r if b) * 16384
        print(f"| step plan, {batch} pairs over {world} ranks | {tot / cap:.4f} | {worst:.3f} | "
              f"{time.perf_counter() - t:.2f} |")


if __name__ == "__main__":
    main()
