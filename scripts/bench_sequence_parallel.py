"""Per-rank peak memory and step time of one long packed pair, SP = 1 (one rank) against SP = 2 (two ranks), CPU.

    python scripts/bench_sequence_parallel.py [--tokens 32768 --hidden 256 --layers 4 --repeats 2]

Launches itself under `deepspeed --num_gpus SP` for each SP size. Every rank sets up as the trainer does
(`btrm.distributed.setup_distributed`: threads shared between local ranks, freed memory retained), loads the same
random-init Llama reward model (`btrm_segment` attention; with SP, through `btrm.sequence_parallel.enable`) and runs
forward + backward of the BT loss over one row holding one pair of two `tokens / 2`-token conversations, through
the trainer's reward functions (`packed_rewards` / `sequence_parallel.rewards`). Memory, per rank:
"saved for backward" = the bytes of the tensors autograd keeps for the backward (the activations; exact, counted
through `torch.autograd.graph.saved_tensors_hooks`); "step peak" = the resident set's high-water mark over the
steps less the resident set after loading (activations, gradients, the all-to-all buffers; glibc keeps freed
memory, as the trainer sets it); "peak RSS" = the whole process at its highest (libraries included). Time: best of
`--repeats` after one warm-up step. The rewards of both layouts are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from btrm import sequence_parallel
    from btrm.attention import SEGMENT
    from btrm.data.packing import collate_pairs
    from btrm.distributed import setup_distributed
    from btrm.loss import bt_loss
    from btrm.modeling import packed_rewards

    dist = setup_distributed(sp_size=args.sp)
    torch.manual_seed(0)  # the same score head on every rank and in both runs
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, attn_implementation=SEGMENT)
    model.config.pad_token_id = 0
    if args.sp > 1:
        sequence_parallel.enable(model, SEGMENT, dist)
    gen = torch.Generator().manual_seed(0)
    half = args.tokens // 2
    chosen, rejected = (torch.randint(0, model.config.vocab_size, (half,), generator=gen).tolist() for _ in range(2))
    batch = collate_pairs([chosen], [rejected])

    saved: dict[int, int] = {}  # storage -> bytes of the tensors autograd keeps for backward

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step():
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rewards = sequence_parallel.rewards(model, batch, dist) if args.sp > 1 else packed_rewards(model, batch)
            loss, _ = bt_loss(rewards[0:1], rewards[1:2])
        loss.backward()
        return rewards.detach().tolist()

    dist.barrier()
    loaded = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rewards = step()  # warm-up: gradients allocated, kernels loaded
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    (Path(args.model) / f"result-sp{args.sp}-rank{dist.rank}.json").write_text(json.dumps({"sp": args.sp, "rank": dist.rank, "tokens": args.tokens, "rewards": rewards,
                                 "time_s": min(times), "saved_gib": sum(saved.values()) / 2**30,
                                 "step_peak_gib": (peak - loaded) / 2**20, "peak_rss_gib": peak / 2**20}))
    dist.shutdown()


def launch(sp: int, args, model_dir: str) -> list[dict]:
    """The ranks' results of one `deepspeed --num_gpus sp` run of this script."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(sp), "--master_port", str(port),
           __file__, "--sp", str(sp), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--model", model_dir]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    files = [Path(model_dir) / f"result-sp{sp}-rank{r}.json" for r in range(sp)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        sys.exit(f"SP={sp} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(f.read_text()) for f in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="row length: one pair of two tokens/2 conversations")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sp", type=int, default=0, help=argparse.SUPPRESS)  # set for the launched ranks
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher adds it
    args = ap.parse_args()
    if args.sp:
        return worker(args)
    from btrm.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_model("llama3", model_dir, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                         num_kv_heads=4, intermediate_size=4 * args.hidden)
        results = {sp: launch(sp, args, model_dir) for sp in (1, 2)}
    print(f"one pair of 2 x {args.tokens // 2:,} tokens ({args.tokens:,}-token row), Llama {args.layers} layers x "
          f"{args.hidden}, fp32, btrm_segment; best of {args.repeats}")
    print("| SP | rank | step s | saved for backward GiB | step peak GiB | peak RSS GiB |\n"
          "|---|---:|---:|---:|---:|---:|")
    for sp, rows in results.items():
        for r in rows:
            print(f"| {sp} | {r['rank']} | {r['time_s']:.2f} | {r['saved_gib']:.3f} | {r['step_peak_gib']:.3f} | "
                  f"{r['peak_rss_gib']:.3f} |")
    one = results[1][0]
    for key in ("saved_gib", "step_peak_gib", "peak_rss_gib"):
        worst = max(r[key] for r in results[2])
        print(f"{key}: largest SP=2 rank / SP=1 = {worst / one[key]:.2f}")
    print(f"rewards SP=1 {one['rewards']} SP=2 {results[2][0]['rewards']}")


if __name__ == "__main__":
    main()
