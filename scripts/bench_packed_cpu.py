"""Packed forward+backward over one 16K-token row vs the same segments one by one (CPU).

    python scripts/bench_packed_cpu.py [--segments 16 --seg-len 1024 --repeats 3]

The packed row uses btrm's `btrm_segment` attention (cost sum(s_i^2)); `sdpa` (transformers' dense block mask
from position_ids, cost T^2) is shown for reference. Both paths run with the process settings the trainer uses on
CPU (`btrm.cpu.retain_freed_memory`); `--no-retain` leaves glibc's defaults, to show what that setting is for.
Minor page faults and system time per timed run are printed beside the times.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from btrm.attention import SEGMENT
from btrm.cpu import retain_freed_memory
from btrm.data.packing import pack_sequences
from btrm.modeling import decoder_of
from btrm.tiny import load_tiny_score_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--seg-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-dense", action="store_true", help="skip the T^2 sdpa reference")
    ap.add_argument("--no-retain", action="store_true", help="glibc malloc defaults instead of the trainer's")
    args = ap.parse_args()
    retained = False if args.no_retain else retain_freed_memory()
    torch.manual_seed(0)
    model = load_tiny_score_model(args.hidden, args.layers, SEGMENT)
    vocab = model.config.vocab_size
    segs = [torch.randint(0, vocab, (args.seg_len,)).tolist() for _ in range(args.segments)]
    ids, pos, cu, max_len = pack_sequences(segs)
    ends = cu[1:].long() - 1

    def packed_step():
        out = decoder_of(model)(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu,
                                cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
        model.score(out.last_hidden_state[0, ends]).sum().backward()

    def one_by_one():
        for s in segs:
            out = decoder_of(model)(input_ids=torch.tensor([s]), use_cache=False)
            model.score(out.last_hidden_state[0, -1:]).sum().backward()

    def timed(fn):
        fn()  # warm-up
        best = (float("inf"), 0, 0.0)
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            best = min(best, (dt, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
        return best

    tokens = args.segments * args.seg_len
    rows = [("packed row, btrm_segment attention", timed(packed_step))]
    rows.append(("segments one by one (sdpa)", timed(one_by_one)))
    if not args.skip_dense:
        model.set_attn_implementation("sdpa")
        rows.append(("packed row, sdpa dense block mask", timed(packed_step)))
        model.set_attn_implementation(SEGMENT)
    print(f"{args.segments} x {args.seg_len} tokens, Llama {args.layers} layers x {args.hidden} hidden, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}, freed memory retained: {retained}")
    print("| path | fwd+bwd s | tokens/s | vs one-by-one | minor page faults | system s |\n|---|---|---|---|---|---|")
    base = rows[1][1][0]
    for name, (t, faults, sys_s) in rows:
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {base / t:.2f}x | {faults:,} | {sys_s:.2f} |")


if __name__ == "__main__":
    main()
