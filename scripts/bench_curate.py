"""Curation throughput and memory: `btrm data clean|dedup|decontaminate|stats` at --num-proc 1 and 2.

    python scripts/bench_curate.py [--pairs 1000000 --num-proc 1 2]

Synthetic pairs (~60 words each side, 3% exact duplicates, 1% invalid rows, 0.5% sharing a 13-gram with a
benchmark prompt) in one jsonl file. Each (step, num_proc) runs in a fresh process; the table gives pairs/s, the
peak RSS of the main process and of the largest worker, the CPU seconds of the main process and of all workers
(load-independent: on a shared machine wall time is not), and checks that every --num-proc gives the same output
bytes as --num-proc 1. "40M on P free cores" = 40M x max(main CPU, workers CPU / P) per pair: the main process
(reading lines, ordering, writing) is the serial part. Dedup's extra memory is its key set (SeenKeys), stated per
million distinct pairs.
`filter` is bound by the reward model's scoring throughput (scripts/bench_score.py), not by curation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("clean", "dedup", "decontaminate", "stats")
WORDS = ("the model reads a conversation and returns one number that says how good the answer is while people "
         "write questions about trains rain music books homework and the calm ocean").split()


def write_data(path: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rnd = random.Random(seed)
    bench_prompts = [" ".join(rnd.choices(WORDS, k=20)) + f" bench{i}" for i in range(200)]
    with path.open("w") as f:
        last = None
        for i in range(n):
            r = rnd.random()
            if r < 0.03 and last is not None:  # exact duplicate of the previous row
                f.write(last)
                continue
            if r < 0.04:
                f.write(json.dumps({"chosen": [{"role": "user", "content": "q"}], "rejected": None}) + "\n")
                continue
            prompt = " ".join(rnd.choices(WORDS, k=15)) + f" id{i}"
            if r < 0.045:
                prompt += " " + rnd.choice(bench_prompts)
            u = {"role": "user", "content": prompt}
            last = json.dumps({"chosen": [u, {"role": "assistant", "content": " ".join(rnd.choices(WORDS, k=45))}],
                               "rejected": [u, {"role": "assistant", "content": " ".join(rnd.choices(WORDS, k=40))}],
                               "source": f"src{i % 4}"}) + "\n"
            f.write(last)
    bench = path.with_name("bench.jsonl")
    bench.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in bench_prompts))
    return path, bench


def one(step: str, data: str, bench: str, tok: str, out: str, num_proc: int) -> None:
    """Run one step in this process; print its timing and peak memory as JSON."""
    from btrm.config import SourceConfig
    from btrm.data import curate

    options = {}
    if step == "decontaminate":
        options = dict(benchmark_files=[bench])
    elif step == "stats":
        from transformers import AutoTokenizer

        options = dict(tokenizer=AutoTokenizer.from_pretrained(tok), max_length=512)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    report = curate.run_command(step, [SourceConfig(path=data)], out, num_proc=num_proc, **options)
    seconds = time.perf_counter() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # VmHWM, not RUSAGE_SELF's maxrss: Linux carries the parent's peak across exec into the latter
    hwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "read": report["totals"]["read"], "kept": report["totals"]["kept"],
                      "cpu_main": me.ru_utime + me.ru_stime - before.ru_utime - before.ru_stime,
                      "cpu_workers": kids.ru_utime + kids.ru_stime,
                      "rss_main_mb": hwm / 1024, "rss_worker_mb": kids.ru_maxrss / 1024}))


def seen_keys_bytes(n: int) -> tuple[float, float]:
    """(bytes per distinct key held, peak bytes per key while adding) for n random keys, by tracemalloc."""
    import tracemalloc

    import numpy as np

    from btrm.data.curate import SeenKeys

    rng = np.random.default_rng(0)
    seen = SeenKeys()
    tracemalloc.start()
    for s in range(0, n, 4096):
        k = rng.integers(0, 2**63, size=min(4096, n - s), dtype=np.uint64)
        seen.add(k, np.zeros(len(k), dtype=np.int64))
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held / len(seen), peak / len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        step, data, bench, tok, out, n = args.one
        return one(step, data, bench, tok, out, int(n))
    from btrm.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        data, bench = write_data(tmp / "pairs.jsonl", args.pairs)
        mb = data.stat().st_size / 1e6
        print(f"{args.pairs:,} pairs, {mb:,.0f} MB jsonl ({mb * 1e6 / args.pairs:.0f} B/pair), "
              f"written in {time.perf_counter() - t:.0f} s")
        build_tokenizer("llama3").save_pretrained(tmp / "tok")
        print("| step | num_proc | pairs/s | MB/s | s | CPU s main / workers | peak RSS main / worker MB | kept | "
              "output = num_proc 1 | 40M pairs at this rate | 40M on 2 / 16 free cores |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
        for step in args.steps:
            digests = {}
            for n in args.num_proc:
                out = tmp / f"{step}-{n}" / ("s.json" if step == "stats" else "out.parquet")
                proc = subprocess.run([sys.executable, __file__, "--one", step, str(data), str(bench),
                                       str(tmp / "tok"), str(out), str(n)], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                if step == "stats":
                    digests[n] = hashlib.sha256(json.dumps({k: v for k, v in json.loads(out.read_text()).items()
                                                            if k not in ("output", "histogram")}).encode()).hexdigest()
                else:
                    with out.open("rb") as f:
                        digests[n] = hashlib.file_digest(f, "sha256").hexdigest()
                    out.unlink()
                rate = args.pairs / r["seconds"]
                same = "yes" if digests[n] == digests[args.num_proc[0]] else "**NO**"
                cm, cw = r["cpu_main"], r["cpu_workers"]
                proj = " / ".join(f"{40e6 / args.pairs * max(cm, cw / p) / 3600:.1f} h" for p in (2, 16))
                print(f"| {step} | {n} | {rate:,.0f} | {mb / r['seconds']:,.1f} | {r['seconds']:.1f} | "
                      f"{cm:.1f} / {cw:.1f} | {r['rss_main_mb']:,.0f} / {r['rss_worker_mb']:,.0f} | {r['kept']:,} | "
                      f"{same} | {40e6 / rate / 3600:.1f} h | {proj if n > 1 else '-'} |", flush=True)
    held, peak = seen_keys_bytes(min(args.pairs, 4_000_000))
    print(f"\ndedup key set: {held:.1f} B per distinct pair held, {peak:.1f} B peak while merging "
          f"-> {held:.0f} MB held / {peak:.0f} MB peak per million distinct pairs; "
          f"40M distinct pairs: {held * 40:,.0f} MB / {peak * 40:,.0f} MB")


if __name__ == "__main__":
    main()
