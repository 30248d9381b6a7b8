"""GPU check: packed-vs-unpacked correctness per attention backend (bf16), then tokens/s and MFU at 16K packs.

    scripts/gpu_check.sh                      # one H100/H200, < 8 minutes, no network, no DeepSpeed needed
    python scripts/gpu_check.py --dry-run     # same code path on CPU with tiny shapes (CI)

1. Correctness (bf16): for each backend of btrm.attention that runs here in bf16 (eager aside: sdpa's dense mask
   at T^2 memory) the packed forward (`btrm.modeling.packed_rewards`) and the gradient of the summed BT loss are
   compared with per-sequence HF forwards (batch 1, no padding, sdpa). The tolerance is set by bf16 itself: the
   same per-sequence forward in fp32 is the truth, and packed may differ from unpacked by at most twice the
   unpacked bf16 error (two results within e of the truth are within 2e of each other), floored at 2^-7 relative.
   Only parameters are cast to bf16 (the rotary inv_freq stays fp32, as in training), which keeps that floor low
   enough to catch layout bugs; the tolerance is printed with its floor. A self-test proves it: two broken
   layouts (positions not restarting per sequence; each reward read one token early) must FAIL and the correct
   one pass, or the check as a whole fails. The same pairs share a prompt (half the shorter side); they are also
   packed with each prompt once (`data.share_prompt`, btrm.data.prefix) and checked the same way per backend.
2. Throughput: Qwen3-0.6B- and Qwen3-1.7B-shaped random-init models, bf16 weights, fused AdamW, 16,384-token packs
   of long-tailed (lognormal) pairs; forward + backward + optimizer step; packed with and without gradient
   checkpointing, plus a padded baseline over the same pairs (pad-to-longest micro-batches of consecutive pairs
   under the same 16,384 padded-token budget, sdpa with attention_mask). MFU uses btrm.flops (docs/design.md formula:
   6N + 12*L*H*Q*s_bar per token, useful tokens only, recompute not counted) and the peak from its table.

3. Sequence parallelism, on a machine with >= 2 GPUs and DeepSpeed + datasets (else skipped, with the reason
   printed): the real trainer on a Qwen3-0.6B-shaped model, rows of one pair of two long conversations, SP = every
   GPU (16,384 tokens each) against SP = 1 holding the whole row on one GPU: the first step's loss must agree to
   bf16 precision; peak memory per GPU and tokens/s side by side (`run_sp_row`).

Results: a markdown table printed last and `<out>/gpu_check.json` (rewritten after every config, so a run cut
short still leaves what it measured). Each throughput config catches OOM and reports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from btrm.data.packing import best_fit_decreasing, collate_pairs, pad_pairs
from btrm.flops import model_shape, non_embedding_params, peak_flops, train_flops
from btrm.loss import bt_loss
from btrm import attention
from btrm.attention import SEGMENT
from btrm.modeling import enable_activation_checkpointing, packed_rewards
from btrm.tiny import lognormal_lengths

# Qwen3 shapes from the released configs (vocab 151936, tied embeddings; no LM head in a reward model).
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151936),
}
# Dry run: the same code path with shapes a CPU runs in seconds.
DRY_SHAPES = {
    "tiny-a": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=1000),
    "tiny-b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                   intermediate_size=192, vocab_size=1000),
}
CHECK_SHAPE = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                   intermediate_size=3072, vocab_size=151936)  # Qwen3-0.6B layers, 4 of them


# ----------------------------------------------------------------------------------------------------------------------
# Models and data


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """Random-init Qwen3ForSequenceClassification (num_labels 1, score head without bias), built on `device`."""
    from transformers import AutoModelForSequenceClassification, Qwen3Config

    config = Qwen3Config(**shape, num_labels=1, pad_token_id=0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_cache=False,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.to(device)  # buffers (rotary inv_freq) stay fp32 as from_config made them


def lognormal_pairs(n: int, vocab: int, scale: float, max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) token lists sharing a prompt: prompt ~ lognormal(median 300*scale, sigma 1.0),
    each response ~ lognormal(median 400*scale, sigma 0.9); each sequence at most `max_len` tokens."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(1, vocab, size=min(lognormal_lengths(rng, 300 * scale, 1.0), max_len // 2)).tolist()
        c, r = (rng.integers(1, vocab, size=min(lognormal_lengths(rng, 400 * scale, 0.9),
                                                max_len - len(prompt))).tolist() for _ in range(2))
        pairs.append((prompt + c, prompt + r))
    return pairs


def padded_groups(pairs, budget: int) -> list[list[int]]:
    """Consecutive pairs per micro-batch while 2n * longest <= budget padded tokens (pad-to-longest batching)."""
    groups, cur, longest = [], [], 0
    for i, (c, r) in enumerate(pairs):
        m = max(longest, len(c), len(r))
        if cur and 2 * (len(cur) + 1) * m > budget:
            groups.append(cur)
            cur, m = [], max(len(c), len(r))
        cur.append(i)
        longest = m
    if cur:
        groups.append(cur)
    return groups


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Correctness


# eager builds the same dense block mask as sdpa with T^2 attention weights in memory: not worth the minutes here
NOT_CHECKED = {"eager": "same dense mask as sdpa, T^2 memory"}


def available_backends(device, dtype) -> dict[str, str | None]:
    """transformers name -> None if usable here in `dtype`, else why it is skipped (btrm.attention's table)."""
    return {b.hf_name: NOT_CHECKED.get(b.name) or attention.why_not(b, device, dtype)
            for b in attention.BACKENDS.values()}


def cast_params(model, dtype):
    """Cast parameters only, as DeepSpeed (>= 0.19.2) and from_pretrained(dtype=...) do: the rotary inv_freq
    buffers stay fp32 (in bf16 they alone put the bf16-vs-fp32 noise at ~0.28 on rewards of ~1.3)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def rewards_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    rewards = fn()
    loss, _ = bt_loss(rewards[0::2], rewards[1::2])
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return rewards.detach().float().cpu(), grads.cpu()


def per_sequence(model, seqs, device):
    """Unpacked reference: one HF forward per sequence (batch 1, no padding), reward at its last token."""
    out = []
    for s in seqs:
        ids = torch.tensor([s], device=device)
        out.append(model(input_ids=ids, use_cache=False).logits[0, 0].float())
    return torch.stack(out)


def broken_layouts(batch) -> dict:
    """The packed batch, and two layouts with the bugs a packing check exists to catch (for the self-test)."""
    t = batch.input_ids.shape[1]
    fields = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                  max_seqlen=batch.max_seqlen, ends=batch.ends)
    return {
        "correct": SimpleNamespace(**fields),
        "positions_not_restarting": SimpleNamespace(**{**fields, "position_ids": torch.arange(t)[None]}),
        "reward_one_token_early": SimpleNamespace(**{**fields, "ends": batch.ends - 1}),
    }


def check_correctness(device, shape: dict, lengths: list[int],
                      seed: int = 0) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """(tolerance, per-backend rows, self-test rows, per-backend rows with shared prompts). Packed bf16 vs unpacked
    bf16, both against the fp32 truth."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, shape["vocab_size"], size=n).tolist() for n in lengths]
    for c, r in zip(seqs[0::2], seqs[1::2]):  # each pair shares a prompt: half its shorter sequence
        p = min(len(c), len(r)) // 2
        r[:p] = c[:p]
    batch = collate_pairs(seqs[0::2], seqs[1::2])
    # fp32 truth and the unpacked bf16 reference (same weights: the bf16 model is the fp32 one, parameters cast)
    model = build_model(shape, device, torch.float32, "sdpa", seed)
    r32, g32 = rewards_and_grads(model, lambda: per_sequence(model, seqs, device))
    cast_params(model, torch.bfloat16)
    r16, g16 = rewards_and_grads(model, lambda: per_sequence(model, seqs, device))
    # two results within e of the truth are within 2e of each other; floored at 2^-7 (bf16's own resolution)
    floor_r = float((r16 - r32).abs().max())
    floor_g = float((g16 - g32).norm() / g32.norm())
    tol = {"floor_abs": floor_r, "floor_grad_rel": floor_g, "max_abs_reward": float(r32.abs().max()),
           "tol_abs": max(2 * floor_r, 2 ** -7 * float(r32.abs().max())), "tol_grad_rel": max(2 * floor_g, 2 ** -7)}

    def compare(backend, packed):
        model.set_attn_implementation(backend)
        rp, gp = rewards_and_grads(model, lambda: packed_rewards(model, packed))
        d_r, d_g = float((rp - r16).abs().max()), float((gp - g16).norm() / g32.norm())
        return {"status": "pass" if d_r <= tol["tol_abs"] and d_g <= tol["tol_grad_rel"] else "FAIL",
                "max_abs_diff": d_r, "grad_rel_diff": d_g, "packed_vs_fp32_max_abs": float((rp - r32).abs().max())}

    def per_backend(packed):
        rows = []
        for backend, why_not in available_backends(device, torch.bfloat16).items():
            row = {"backend": backend, "segments": len(lengths), "tokens": packed.num_tokens}
            if why_not:
                rows.append({**row, "status": "skipped", "reason": why_not})
                continue
            try:
                rows.append({**row, **compare(backend, packed)})
            except Exception as e:  # a backend that breaks is a finding, not a crash
                rows.append({**row, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500]})
        return rows

    rows = per_backend(batch)
    # shared prompts: every pair's prompt in the row once, each response attending to it (fewer tokens)
    shared = per_backend(collate_pairs(seqs[0::2], seqs[1::2], share=True, min_prefix=1))
    # self-test: the check must catch the layout bugs. sdpa derives its block mask from position_ids, so positions
    # that do not restart let every sequence attend to the ones before it.
    self_test = []
    for layout, packed in broken_layouts(batch).items():
        r = compare("sdpa", packed)
        expect = "pass" if layout == "correct" else "FAIL"
        self_test.append({"layout": layout, "backend": "sdpa", "expected": expect, **r,
                          "ok": r["status"] == expect})
    model = None  # noqa: F841  (freed before the throughput runs)
    free_memory(device)
    return tol, rows, self_test, shared


# ----------------------------------------------------------------------------------------------------------------------
# 2. Throughput


def make_packs(shape, pack_tokens, n_packs, scale, seed):
    """`n_packs` best-fit-decreasing packs of whole pairs from a pool just large enough (the emptiest bins are
    dropped, so the kept pairs are close to an unbiased sample of the length distribution)."""
    n = int(n_packs * pack_tokens / (2200 * scale))  # ~2200 tokens per pair at scale 1
    while True:
        n = int(n * 1.1) + 1
        pairs = lognormal_pairs(n, shape["vocab_size"], scale, pack_tokens // 2, seed)
        sizes = [len(c) + len(r) for c, r in pairs]
        bins = best_fit_decreasing(sizes, pack_tokens)
        if len(bins) >= n_packs:
            break
    bins = sorted(bins, key=lambda b: -sum(sizes[i] for i in b))[:n_packs]
    return [[pairs[i] for i in sorted(b)] for b in bins]


def time_config(model, device, steps_data, warmup: int, mode: str, pad_budget: int) -> dict:
    """Run warm-up + timed optimizer steps; steps_data[i] = list of packs (lists of pairs) of step i."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    model.train()
    real = padded = 0
    segs: list[int] = []
    t0 = None
    for i, packs in enumerate(steps_data):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        step_pairs = [p for pack in packs for p in pack]
        n = len(step_pairs)
        if mode == "packed":
            for pack in packs:
                batch = collate_pairs([c for c, _ in pack], [r for _, r in pack])
                rewards = packed_rewards(model, batch)
                loss, _ = bt_loss(rewards[0::2], rewards[1::2])
                (loss / n).backward()
                if i >= warmup:
                    padded += batch.num_tokens
        else:
            for g in padded_groups(step_pairs, pad_budget):
                ids, mask = pad_pairs([step_pairs[k][0] for k in g], [step_pairs[k][1] for k in g],
                                      model.config.pad_token_id)
                ids, mask = ids.to(device), mask.to(device)
                rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
                loss, _ = bt_loss(rewards[:len(g)], rewards[len(g):])
                (loss / n).backward()
                if i >= warmup:
                    padded += mask.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            lens = [len(s) for p in step_pairs for s in p]
            real += sum(lens)
            segs += lens
    sync(device)
    dt = time.perf_counter() - t0
    del opt
    return {"time_s": dt, "real_tokens": real, "padded_tokens": padded, "seg_lengths": segs}


def run_throughput(device, name: str, shape: dict, args, pack_tokens: int, scale: float) -> list[dict]:
    n_steps = args.warmup + args.steps
    packs = make_packs(shape, pack_tokens, n_steps * args.packs_per_step, scale, args.seed)
    steps_data = [packs[i * args.packs_per_step:(i + 1) * args.packs_per_step] for i in range(n_steps)]
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    # the packed backends worth timing here, btrm's default (`auto`) first
    default = attention.select("auto", device, args.dtype)  # the backend training would use here
    fast = [b for b, why in available_backends(device, args.dtype).items() if why is None and b != "sdpa"]
    if device.type == "cuda":
        fast = [b for b in fast if b != SEGMENT]  # per-segment python loop: the CPU path
    fast = sorted(fast, key=lambda b: b != default) or ["sdpa"]
    configs = [("packed", b, False) for b in fast] + [("packed", fast[0], True), ("padded", "sdpa", False)]
    rows = []
    for mode, attn, ckpt in configs:
        row = {"model": name, "mode": mode, "attn": attn, "grad_ckpt": ckpt, "pack_tokens": pack_tokens}
        if time.perf_counter() - START > args.budget_s:
            rows.append({**row, "status": "skipped", "reason": f"time budget {args.budget_s}s spent"})
            continue
        model = None
        try:
            free_memory(device)
            model = build_model(shape, device, args.dtype, attn, args.seed)
            if ckpt:
                enable_activation_checkpointing(model)
            n_params = non_embedding_params(model)
            r = time_config(model, device, steps_data, args.warmup, mode, pack_tokens)
            flops = train_flops(n_params, *model_shape(model.config), r["seg_lengths"])
            s_bar = sum(s * s for s in r["seg_lengths"]) / r["real_tokens"]
            row.update(status="ok", non_embedding_params=n_params, tokens_per_s=r["real_tokens"] / r["time_s"],
                       time_s=r["time_s"], real_tokens=r["real_tokens"],
                       padding_share=1 - r["real_tokens"] / r["padded_tokens"], s_bar=s_bar,
                       achieved_tflops=flops / r["time_s"] / 1e12,
                       mfu=flops / r["time_s"] / peak if peak else None,
                       peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        except torch.OutOfMemoryError as e:
            row.update(status="OOM", reason=str(e).splitlines()[0][:300])
        except Exception as e:
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])
        finally:
            del model
            free_memory(device)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Sequence parallelism (several GPUs only)

SP_SHAPE = dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=3072)  # Qwen3-0.6B
SP_TOKENS_PER_GPU = 16384


def sp_skip_reason(dry: bool) -> str | None:
    if dry:
        return "dry run on CPU: the SP row needs >= 2 GPUs (the CPU tests check SP numerics)"
    n = torch.cuda.device_count()
    if n < 2:
        return f"{n} GPU visible: the SP row needs >= 2"
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ValueError:  # blocked in sys.modules
            return True

    missing = [m for m in ("deepspeed", "datasets") if absent(m)]
    if missing:
        return f"{' and '.join(missing)} not installed (WHEELS=/dir with their wheels)"
    return None


def run_sp_row(args, out: Path) -> dict:
    """The real trainer (`train.py` under the `deepspeed` launcher) on a Qwen3-0.6B-shaped model, one pair of two
    long conversations per row: SP = every GPU (16,384 tokens each) against SP = 1 holding the whole row on one GPU.
    Same data, same single data-parallel group, so the first step's loss must agree (bf16); peak memory per GPU
    (rank 0, `peak_memory_gib`) and tokens/s side by side. Needs DeepSpeed and datasets on the machine."""
    import subprocess
    import sys

    import yaml

    from btrm.tiny import build_tiny_model, make_preference_rows

    n = torch.cuda.device_count()
    sp = max(d for d in (2, 4, 8, 16) if d <= n and SP_SHAPE["num_heads"] % d == 0)
    row_tokens = SP_TOKENS_PER_GPU * sp
    work = out / "sp"
    model_dir = build_tiny_model("qwen3", work / "model", **SP_SHAPE)
    rng = np.random.default_rng(args.seed)
    rows = make_preference_rows(4, args.seed)
    words = " ".join(m["content"] for r in rows for m in r["chosen"] + r["rejected"]).split()
    with (work / "pairs.jsonl").open("w") as f:
        for r in rows:  # a long shared context before each question, cut from the left to fit max_length
            context = " ".join(rng.choice(words, size=row_tokens))
            for side in ("chosen", "rejected"):
                r[side][0] = {**r[side][0], "content": context + "\n\n" + r[side][0]["content"]}
            f.write(json.dumps(r) + "\n")
    config = {"model": {"name_or_path": str(model_dir), "dtype": "bf16", "gradient_checkpointing": True},
              "data": {"sources": [{"path": str(work / "pairs.jsonl")}], "max_length": row_tokens // 2,
                       "overlong": "truncate_prompt_left", "share_prompt": False, "cache_dir": str(work / "cache")},
              "optim": {"lr": 1e-5}, "train": {"global_batch_pairs": 2, "max_steps": 2, "seed": args.seed},
              "logging": {"wandb": False, "progress": False}, "checkpoint": {"save_final": False}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    result = {"sp": sp, "row_tokens": row_tokens, "shape": SP_SHAPE, "runs": {}}
    for size, gpus in ((1, 1), (sp, sp)):
        run_dir = work / f"sp{size}"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "train.py",
               "--config", str(work / "config.yaml"), f"--train.sequence_parallel_size={size}",
               f"--data.max_tokens={row_tokens // size}", f"--train.output_dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=600)
        (work / f"sp{size}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            return {**result, "status": "error", "reason": f"SP={size} run failed ({proc.returncode}): "
                    + (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
        result["runs"][size] = {"loss": [m["loss"] for m in steps], "wall_s": time.perf_counter() - t0,
                                "tokens_per_s": steps[-1].get("tokens_per_s"),
                                "peak_mem_gib": max(m.get("peak_memory_gib", 0.0) for m in steps)}
    one, many = result["runs"][1], result["runs"][sp]
    result["first_loss_abs_diff"] = abs(one["loss"][0] - many["loss"][0])
    result["peak_mem_ratio"] = many["peak_mem_gib"] / one["peak_mem_gib"] if one["peak_mem_gib"] else None
    ok = result["first_loss_abs_diff"] <= 2 ** -7 * max(1.0, abs(one["loss"][0]))  # bf16 relative precision
    return {**result, "status": "pass" if ok else "FAIL"}


def sp_line(r: dict) -> str:
    if r["status"] == "skipped":
        return f"SP row: skipped: {r['reason']}"
    if r["status"] == "error":
        return f"SP row: error: {r['reason']}"
    one, many = r["runs"][1], r["runs"][r["sp"]]
    return (f"SP row: {r['status']}: {r['row_tokens']:,}-token rows, SP {r['sp']} vs 1: first loss "
            f"{many['loss'][0]:.4f} vs {one['loss'][0]:.4f}; peak GiB per GPU {many['peak_mem_gib']:.1f} vs "
            f"{one['peak_mem_gib']:.1f} (x{r['peak_mem_ratio']:.2f}); tokens/s {many['tokens_per_s']:,.0f} vs "
            f"{one['tokens_per_s']:,.0f}")


# ----------------------------------------------------------------------------------------------------------------------
# Report


def tolerance_line(tol: dict) -> str:
    return (f"tolerance: rewards {tol['tol_abs']:.2e} = max(2 x floor {tol['floor_abs']:.2e}, 2^-7 x max|r| "
            f"{tol['max_abs_reward']:.2f}); gradients {tol['tol_grad_rel']:.2e} relative = max(2 x floor "
            f"{tol['floor_grad_rel']:.2e}, 2^-7). floor = unpacked bf16 (fp32 buffers) vs unpacked fp32")


def table(result: dict) -> str:
    lines = [tolerance_line(result["tolerance"]), "",
             "| backend | layout | segments / tokens | max abs diff | grad rel diff | status |", "|---|---|---|---|---|---|"]
    for layout, key in (("packed", "correctness"), ("shared prompt", "shared_prompt")):
        for r in result[key]:
            if r["status"] in ("pass", "FAIL"):
                lines.append(f"| {r['backend']} | {layout} | {r['segments']} / {r['tokens']} | "
                             f"{r['max_abs_diff']:.2e} | {r['grad_rel_diff']:.2e} | {r['status']} |")
            else:
                lines.append(f"| {r['backend']} | {layout} | | | | {r['status']}: {r.get('reason', '')} |")
    for r in result["self_test"]:
        lines.append(f"| {r['backend']} | self-test: {r['layout']} | | {r['max_abs_diff']:.2e} | "
                     f"{r['grad_rel_diff']:.2e} | {r['status']} (expected {r['expected']}) |")
    lines += ["", "| model | mode | attention | grad ckpt | real tokens/s | TFLOP/s | MFU | padding | s_bar | "
              "peak mem GiB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['mode']} | {r['attn']} | {r['grad_ckpt']} | | | | | | | "
                         f"{r['status']}: {r.get('reason', '')[:80]} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['attn']} | {r['grad_ckpt']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['achieved_tflops']:.1f} | {mfu} | {r['padding_share']:.1%} | {r['s_bar']:,.0f} | {mem} "
                     "| ok |")
    return "\n".join(lines)


START = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                    help="CPU, tiny shapes (also DRY_RUN=1)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--models", default=None, help="comma-separated subset of the shapes")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per config")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    ap.add_argument("--packs-per-step", type=int, default=2, help="16K packs (micro-batches) per optimizer step")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining configs after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run (DRY_RUN=1) on CPU")
    # the fp32 reference of the correctness check must be real fp32, not TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.steps = args.steps or (2 if dry else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    shapes = DRY_SHAPES if dry else SHAPES
    if args.models:
        shapes = {k: shapes[k] for k in args.models.split(",")}
    pack_tokens, scale = (512, 1 / 32) if dry else (16384, 1.0)
    if dry:
        args.packs_per_step = 1
    args.dtype = torch.float32 if dry else torch.bfloat16  # bf16 matmuls on a CPU are slow and not what we measure
    check_shape = DRY_SHAPES["tiny-a"] if dry else CHECK_SHAPE
    # long and short segments, one of a single token (scaled down 32x in the dry run)
    check_lengths = [max(1, int(n * scale)) for n in (3000, 2100, 270, 640, 700, 1200, 16, 160, 2500, 900)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    result = {
        "dry_run": dry,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"),
        "peak_flops": peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda},
        "settings": {"pack_tokens": pack_tokens, "steps": args.steps, "warmup": args.warmup,
                     "packs_per_step": args.packs_per_step, "shapes": shapes, "check_shape": check_shape,
                     "throughput_dtype": str(args.dtype),
                     "check_dtype": "bf16 (fp32 reference)", "optimizer": "AdamW (fused on CUDA)"},
        "tolerance": None, "correctness": [], "self_test": [], "shared_prompt": [], "throughput": [],
    }
    path = out / "gpu_check.json"

    def save():
        path.write_text(json.dumps(result, indent=1))

    result["tolerance"], result["correctness"], result["self_test"], result["shared_prompt"] = check_correctness(
        device, check_shape, check_lengths, args.seed)
    print(tolerance_line(result["tolerance"]), flush=True)
    for r in result["correctness"] + result["self_test"] + result["shared_prompt"]:
        print(json.dumps(r), flush=True)
    print(f"correctness checked in {time.perf_counter() - START:.0f}s", flush=True)
    save()
    for name, shape in shapes.items():
        result["throughput"] += run_throughput(device, name, shape, args, pack_tokens, scale)
        save()
    reason = sp_skip_reason(dry)
    if reason is None and time.perf_counter() - START > args.budget_s:
        reason = f"time budget {args.budget_s}s spent"
    try:
        result["sequence_parallel"] = ({"status": "skipped", "reason": reason} if reason else run_sp_row(args, out))
    except Exception as e:
        result["sequence_parallel"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(result["sequence_parallel"]), flush=True)
    save()
    # passed = every backend that ran agrees, and the check itself caught both broken layouts
    result["self_test_passed"] = all(r["ok"] for r in result["self_test"])
    result["correctness_passed"] = result["self_test_passed"] and all(
        r["status"] in ("pass", "skipped") for r in result["correctness"] + result["shared_prompt"]) and any(
        r["status"] == "pass" for r in result["correctness"])
    result["best_packed_mfu"] = {
        name: max((r["mfu"] for r in result["throughput"] if r["model"] == name and r["mode"] == "packed"
                   and r["status"] == "ok" and r["mfu"] is not None), default=None) for name in shapes}
    result["elapsed_s"] = time.perf_counter() - START
    save()
    print()
    print(f"device: {result['device']}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{result['elapsed_s']:.0f}s; JSON: {path}")
    print(table(result))
    print()
    print(sp_line(result["sequence_parallel"]))
    print(f"correctness: {'passed' if result['correctness_passed'] else 'FAILED'}; best packed MFU: " + ", ".join(
        f"{k} {v:.1%}" if v is not None else f"{k} n/a" for k, v in result["best_packed_mfu"].items())
        + " (target for the 1.7B shape: >= 40%)")


if __name__ == "__main__":
    main()
