"""Groups of K responses as one item vs the same comparisons flattened to pairs: tokens computed and time per
training step (forward + backward of the bt_pairs objective) on CPU.

    python scripts/bench_groups.py [--k 4 --groups 2 --seq-len 512 --share 0.5 --repeats 3 --threads 1]

One random-init Llama reward model (fp32, `btrm_segment` attention) and --groups groups of --k random-token
sequences of --seq-len tokens whose first `share x seq-len` tokens (the prompt) are common to the group:

  group         each group one item (`collate(share=True)`): the prompt once, K branches; K(K-1)/2 comparisons
  pairs shared  the same comparisons as K(K-1)/2 pairs per group, each pair's prompt once (what a trainer that
                flattens groups to pairs computes, with shared-prompt packing)
  pairs plain   the same pairs, every conversation whole (flattening without prompt sharing)

All three compute the same loss and gradient (checked, printed). The three alternate in one process, --repeats
times after a warm-up, and the best time of each is kept. Runs with the trainer's CPU allocator setting.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shared_prompt import best_alternating, make_items  # noqa: E402

from btrm.config import LossConfig  # noqa: E402
from btrm.cpu import retain_freed_memory  # noqa: E402
from btrm.data.packing import collate  # noqa: E402
from btrm.loss import build_objective  # noqa: E402
from btrm.modeling import SEGMENT, packed_rewards  # noqa: E402
from btrm.tiny import load_tiny_score_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2, help="groups per training step (one row each way)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--share", type=float, default=0.5, help="prompt share of each sequence")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    model = load_tiny_score_model(args.hidden, args.layers, SEGMENT)
    groups = make_items(args.groups, args.k, args.seq_len, args.share, model.config.vocab_size, seed=3)
    pairs = list(itertools.combinations(range(args.k), 2))  # stored best first: i < j means i is preferred
    flat = [[g[i], g[j]] for g in groups for i, j in pairs]
    batches = {"group": collate(groups, share=True), "pairs shared": collate(flat, share=True),
               "pairs plain": collate(flat)}
    objective = build_objective(LossConfig(kind="bt_pairs"))
    losses, grads = {}, {}

    def step(name):
        def run():
            model.zero_grad(set_to_none=True)
            batch = batches[name]
            loss = objective.loss(packed_rewards(model, batch), batch)[0] / objective.units(batch)
            loss.backward()
            losses[name] = loss.item()
            grads[name] = model.score.weight.grad.detach().clone()
        return run

    load = os.getloadavg()[0]
    t = best_alternating({name: step(name) for name in batches}, args.repeats)
    print(f"Llama {args.layers} layers x {args.hidden}, fp32, {SEGMENT}, torch threads {torch.get_num_threads()}; "
          f"{args.groups} groups of K={args.k} sequences of {args.seq_len} tokens, prompt share {args.share}; "
          f"{args.groups * len(pairs)} comparisons per step; best of {args.repeats}; load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print("| layout | items | tokens computed | tokens vs group | step s | time vs group |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch in batches.items():
        ratio = batch.num_tokens / batches["group"].num_tokens
        print(f"| {name} | {batch.n_items} | {batch.num_tokens:,} | {ratio:.2f}x "
              f"| {t[name]:.3f} | {t[name] / t['group']:.2f}x |")
    print("max |loss - group loss|: " + ", ".join(f"{n} {abs(losses[n] - losses['group']):.1e}" for n in batches)
          + "; max |score-head grad - group's|: "
          + ", ".join(f"{n} {(grads[n] - grads['group']).abs().max().item():.1e}" for n in batches))


if __name__ == "__main__":
    main()
