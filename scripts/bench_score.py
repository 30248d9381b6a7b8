"""Scoring throughput on CPU: RewardModel.score (packed) vs the seed's one-at-a-time loop vs padded batches.

    python scripts/bench_score.py [--convs 96 --repeats 2 --hidden 256 --layers 4 --batch-tokens 16384]
                                  [--padded-batch 8 --markdown]

Same tiny random-init Llama reward model (fp32, head drawn N(0, 1)), same synthetic conversations (user prompt and
assistant answer each ~ lognormal in words, long-tailed), same input order. Every timing covers render +
tokenize + forward, as a user's call does:

  packed         btrm.RewardModel.score: sorted by length, best-fit packed into rows of <= batch-tokens tokens,
                 btrm_segment attention, reward at each sequence's end.
  seed loop      the model card's recipe, one conversation per forward (HF model, sdpa).
  padded         HF forward on batches of --padded-batch conversations right-padded to their longest, with
                 attention_mask (sdpa); HF pools the last non-pad token. "unsorted" = input order;
                 "sorted" = batches of length-sorted conversations (what a careful user would do).

Real tokens exclude padding; "padding" is pad / (real + pad) over what the model ran on. Each method runs once on
a small warm-up slice first; then the methods run --repeats times in turn and the best time is shown (a shared
machine's load comes and goes). The rewards of every method are compared with the packed ones (max |diff|).
All methods run with the allocator setting `btrm score` uses on CPU (`btrm.cpu.retain_freed_memory`);
`--no-retain` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

WORDS = ("the a of to and in is it that for on with as was at by this from or be are an have not but what all were "
         "when we there can your which their said if do will each about how up out them then she many some so these "
         "would other into has more her two like him see time could no make than first been its who now people my "
         "made over did down only way find use may water long little very after words called just where most know "
         "river coffee garden music train winter bread owl volcano library desert mountain tea").split()


def make_conversations(n: int, seed: int) -> list[list[dict]]:
    from btrm.tiny import lognormal_text

    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": lognormal_text(rng, WORDS, 48, 1.0, 1500)},
             {"role": "assistant", "content": lognormal_text(rng, WORDS, 64, 0.9, 1500)}] for _ in range(n)]


def build_model(work: str, hidden: int, layers: int) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from btrm.modeling import ensure_pad_token
    from btrm.tiny import build_tiny_model

    base = build_tiny_model("llama3", os.path.join(work, "base"), hidden_size=hidden, num_layers=layers, num_heads=8,
                            num_kv_heads=4, intermediate_size=4 * hidden)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=ensure_pad_token(tok))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    out = os.path.join(work, "rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def seed_text(tok, conv) -> str:
    text = tok.apply_chat_template(conv, tokenize=False)
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text


@torch.inference_mode()
def seed_loop(model, tok, convs):
    out = []
    for c in convs:
        out.append(model(**tok(seed_text(tok, c), return_tensors="pt")).logits[0][0].item())
    return out, 0


@torch.inference_mode()
def padded(model, tok, convs, batch: int, sort: bool):
    texts = [seed_text(tok, c) for c in convs]
    order = list(range(len(texts)))
    if sort:
        lengths = [len(x) for x in tok(texts)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    out, pad = [0.0] * len(texts), 0
    tok.padding_side = "right"
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True)
        pad += int((enc["attention_mask"] == 0).sum())
        for i, r in zip(idx, model(**enc).logits[:, 0].tolist()):
            out[i] = r
    return out, pad


def timed(fn, *args):
    t0 = time.perf_counter()
    rewards, pad = fn(*args)
    return rewards, pad, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method (interleaved; best is shown)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--padded-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    ap.add_argument("--no-retain", action="store_true", help="glibc malloc defaults instead of btrm score's")
    args = ap.parse_args()
    from btrm.cpu import retain_freed_memory

    retained = False if args.no_retain else retain_freed_memory()

    from transformers import AutoModelForSequenceClassification

    from btrm.inference.scorer import RewardModel

    with tempfile.TemporaryDirectory() as work:
        path = build_model(work, args.hidden, args.layers)
        rm = RewardModel.from_pretrained(path, dtype="fp32", batch_tokens=args.batch_tokens)
        hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    tok = rm.tokenizer
    convs = make_conversations(args.convs, args.seed)
    lengths = [len(x) for x in rm.encode(convs)]
    real = sum(lengths)
    methods = {
        "packed (RewardModel.score)": lambda c: (rm.score(c, progress=False), 0),
        "seed loop (1 per forward)": lambda c: seed_loop(hf, tok, c),
        f"padded x{args.padded_batch}, unsorted": lambda c: padded(hf, tok, c, args.padded_batch, False),
        f"padded x{args.padded_batch}, sorted": lambda c: padded(hf, tok, c, args.padded_batch, True),
    }
    for fn in methods.values():
        fn(convs[:16])  # warm-up
    best, pads, diffs = {}, {}, {}
    reference = None
    for _ in range(args.repeats):  # interleaved, best of N: a shared machine's load comes and goes
        for name, fn in methods.items():
            rewards, pads[name], dt = timed(fn, convs)
            reference = reference or rewards
            diffs[name] = max(abs(a - b) for a, b in zip(rewards, reference))
            best[name] = min(dt, best.get(name, float("inf")))
    rows = [(name, len(convs) / best[name], real / best[name], pads[name] / (real + pads[name]), best[name],
             diffs[name]) for name in methods]

    n_params = sum(p.numel() for n, p in hf.named_parameters() if "embed" not in n)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}; tiny Llama hidden {args.hidden}, "
          f"{args.layers} layers, {n_params / 1e6:.1f}M non-embedding params, fp32; freed memory retained: {retained}")
    print(f"# {len(convs)} conversations, {real} tokens: mean {np.mean(lengths):.0f}, median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {max(lengths)}; packed budget {args.batch_tokens} tokens")
    base = rows[1][1]
    if args.markdown:
        print("| method | conv/s | real tokens/s | padding | best time (s) | vs seed loop | max abs diff vs packed |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, cps, tps, padf, dt, diff in rows:
            print(f"| {name} | {cps:.1f} | {tps:,.0f} | {padf:.0%} | {dt:.1f} | {cps / base:.2f}x | {diff:.1e} |")
    else:
        print(f"{'method':32} {'conv/s':>8} {'tokens/s':>10} {'padding':>8} {'time s':>7} {'vs seed':>8} {'max|diff|':>10}")
        for name, cps, tps, padf, dt, diff in rows:
            print(f"{name:32} {cps:8.1f} {tps:10,.0f} {padf:8.0%} {dt:7.1f} {cps / base:7.2f}x {diff:10.1e}")


if __name__ == "__main__":
    main()
