"""Shared-prompt packing vs plain packing on CPU: training forward+backward and scoring forward, same sequences.

    python scripts/bench_shared_prompt.py [--seq-len 1024 --pairs 4 --best-of 16 --repeats 3]

One random-init Llama reward model (fp32, `btrm_segment` attention), random token sequences of --seq-len tokens
whose first `share x seq-len` tokens (the prompt) are common to the sequences of an item:

  training   --pairs pairs in one row (2 x pairs x seq-len tokens unshared), BT loss, forward + backward.
             plain = today's packed row (`collate_pairs`, `packed_rewards`); shared = `collate(share=True)`
             (each prompt once, then both responses).
  scoring    the same pairs, forward only, through `RewardModel.score_ids` with share_prompt off / on.
  best-of-N  one prompt of 70% of --seq-len and --best-of responses, `RewardModel.score_ids` off / on.

Effective tokens/s counts the tokens the plain path computes (the sequences' own), per second, for both paths.
The ideal ratio is unshared tokens / shared tokens (the linear layers' work); attention differs a little. Shared
and plain runs alternate in one process, --repeats times after a warm-up, and the best time of each is kept (load
from other jobs comes and goes). Runs with the trainer's CPU allocator setting (`btrm.cpu.retain_freed_memory`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from btrm.cpu import retain_freed_memory
from btrm.data.packing import collate, collate_pairs
from btrm.inference.scorer import RewardModel
from btrm.loss import bt_loss
from btrm.modeling import SEGMENT, packed_rewards
from btrm.tiny import load_tiny_score_model


def make_items(n_items: int, per_item: int, seq_len: int, share: float, vocab: int, seed: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    p = int(round(share * seq_len))
    items = []
    for _ in range(n_items):
        prompt = torch.randint(10, vocab, (p,), generator=g).tolist()
        # each response starts with its own token, so the shared prefix is exactly the prompt
        items.append([prompt + [10 + k] + torch.randint(10, vocab, (seq_len - p - 1,), generator=g).tolist()
                      for k in range(per_item)])
    return items


def best_alternating(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per training / scoring row")
    ap.add_argument("--shares", default="0.2,0.5,0.8")
    ap.add_argument("--best-of", type=int, default=16)
    ap.add_argument("--best-of-share", type=float, default=0.7)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier "
                    "on a machine other jobs load")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    model = load_tiny_score_model(args.hidden, args.layers, SEGMENT)
    vocab = model.config.vocab_size
    load = os.getloadavg()[0]
    print(f"Llama {args.layers} layers x {args.hidden}, fp32, {SEGMENT}, torch threads {torch.get_num_threads()}, "
          f"sequences of {args.seq_len} tokens, best of {args.repeats}, load average at start {load:.1f}")
    print("| workload | prompt share | tokens plain / shared | ideal ratio | plain s | shared s | "
          "plain eff. tok/s | shared eff. tok/s | time ratio | of ideal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def report(name, share, plain_tokens, shared_tokens, t):
        ideal, ratio = plain_tokens / shared_tokens, t["plain"] / t["shared"]
        print(f"| {name} | {share:.1f} | {plain_tokens:,} / {shared_tokens:,} | {ideal:.2f}x | {t['plain']:.3f} | "
              f"{t['shared']:.3f} | {plain_tokens / t['plain']:,.0f} | {plain_tokens / t['shared']:,.0f} | "
              f"{ratio:.2f}x | {ratio / ideal:.2f} |", flush=True)

    def rm(share_prompt):
        return RewardModel(model, None, max_length=args.seq_len, batch_tokens=2 * args.pairs * args.seq_len,
                           share_prompt=share_prompt)

    rm_plain, rm_shared = rm(False), rm(True)
    for share in (float(s) for s in args.shares.split(",")):
        items = make_items(args.pairs, 2, args.seq_len, share, vocab, seed=int(share * 100))
        plain_batch = collate_pairs([i[0] for i in items], [i[1] for i in items])
        shared_row = collate(items, share=True)

        def step(rewards_fn):
            def run():
                model.zero_grad(set_to_none=True)
                r = rewards_fn()
                bt_loss(r[0::2], r[1::2])[0].backward()
            return run

        t = best_alternating({"plain": step(lambda: packed_rewards(model, plain_batch)),
                              "shared": step(lambda: packed_rewards(model, shared_row))}, args.repeats)
        report("training fwd+bwd, pairs", share, shared_row.prefix.sequence_tokens, shared_row.num_tokens, t)

        seqs = [s for item in items for s in item]
        with torch.inference_mode():
            t = best_alternating({"plain": lambda: rm_plain.score_ids(seqs),
                                  "shared": lambda: rm_shared.score_ids(seqs)}, args.repeats)
        report("scoring fwd, pairs", share, shared_row.prefix.sequence_tokens, shared_row.num_tokens, t)

    items = make_items(1, args.best_of, args.seq_len, args.best_of_share, vocab, seed=7)
    seqs = items[0]
    rm_plain.batch_tokens = rm_shared.batch_tokens = args.best_of * args.seq_len  # the whole group in one row
    with torch.inference_mode():
        t = best_alternating({"plain": lambda: rm_plain.score_ids(seqs),
                              "shared": lambda: rm_shared.score_ids(seqs)}, args.repeats)
    row = collate(items, share=True)
    report(f"scoring fwd, best-of-{args.best_of}", args.best_of_share, row.prefix.sequence_tokens, row.num_tokens, t)
    got, want = rm_shared.score_ids(seqs), rm_plain.score_ids(seqs)
    print(f"max |shared - plain| reward over the best-of-{args.best_of} group: "
          f"{max(abs(a - b) for a, b in zip(got, want)):.2e}; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
