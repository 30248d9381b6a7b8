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


class PeakMemory:
    """Samples this process and its children (the tokenizing workers) every 0.2 s: peak anonymous memory (the
    heap, what can run a machine out of memory) and peak total RSS, which also counts pages of memory-mapped Arrow
    files that were read (page cache the kernel reclaims under pressure)."""

    def __init__(self):
        import threading

        import psutil

        self.me = psutil.Process()
        self.peak = {"main_anon": 0, "main_rss": 0, "worker_anon": 0, "worker_rss": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self, proc, who):
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "VmRSS")))
        except OSError:
            return
        if "RssAnon" not in kv:  # a worker that has exited (a zombie until its pool reaps it)
            return
        self.peak[f"{who}_anon"] = max(self.peak[f"{who}_anon"], int(kv["RssAnon"].split()[0]) / 1024)
        self.peak[f"{who}_rss"] = max(self.peak[f"{who}_rss"], int(kv["VmRSS"].split()[0]) / 1024)

    def _run(self):
        import json
        import sys

        import psutil

        t0 = time.monotonic()
        next_report = 60.0
        while not self.stop.wait(0.2):
            self._sample(self.me, "main")
            try:  # each segment's `map` starts and ends its own pool of workers
                children = self.me.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                self._sample(child, "worker")
            if time.monotonic() - t0 >= next_report:  # a long run shows its peaks so far on stderr
                print(json.dumps({"elapsed_s": round(next_report), **self.peak}), file=sys.stderr, flush=True)
                next_report += 60.0

    def result(self) -> dict:
        self.stop.set()
        self.thread.join()
        self._sample(self.me, "main")
        return self.peak


def scale_one(n: int, nproc: int, work: Path) -> None:
    """One pipeline run in this (fresh) process; prints a JSON line with its figures."""
    import json

    from transformers import AutoTokenizer

    from btrm.data.pipeline import prepare_cache

    tok = AutoTokenizer.from_pretrained(work / "model")
    ensure_pad_token(tok)
    cfg = DataConfig(sources=[SourceConfig(path=str(work / f"long-{n}.jsonl"))], num_proc=nproc, eval_fraction=0.01,
                     max_length=16384, max_tokens=32768)
    root = work / f"cache-{n}-{nproc}"
    mem = PeakMemory()
    t = time.perf_counter()
    prepare_cache(cfg, tok, 0, root)
    dt = time.perf_counter() - t
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(json.dumps({"pairs": n, "num_proc": nproc, "seconds": dt, "cache_mb": size / 2**20, **mem.result()}),
          flush=True)
    shutil.rmtree(root)


def scale(counts: list[int], nprocs: list[int], work: Path) -> None:
    import json
    import subprocess
    import sys

    build_tiny_model("llama3", work / "model")
    print("| pairs | num_proc | s | pairs/s | peak anon MB: main / largest worker | peak RSS MB: main / largest worker "
          "| cache MB | per 1M pairs: h / cache GB | 40M pairs: h / cache GB |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for n in counts:
        f = long_rows(work / f"long-{n}.jsonl", n)
        for nproc in nprocs:
            out = subprocess.run([sys.executable, __file__, "--_one", str(n), str(nproc), str(work)],
                                 stdout=subprocess.PIPE, text=True)
            if out.returncode:
                raise SystemExit(f"run failed: {n} pairs, num_proc {nproc}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per_m_h, per_m_gb = r["seconds"] / n * 1e6 / 3600, r["cache_mb"] / n * 1e6 / 1024
            print(f"| {n:,} | {nproc} | {r['seconds']:.0f} | {n / r['seconds']:,.0f} | "
                  f"{r['main_anon']:,.0f} / {r['worker_anon']:,.0f} | {r['main_rss']:,.0f} / {r['worker_rss']:,.0f} | "
                  f"{r['cache_mb']:,.0f} | {per_m_h:,.2f} / {per_m_gb:.1f} | {per_m_h * 40:,.0f} / {per_m_gb * 40:,.0f} |",
                  flush=True)
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
