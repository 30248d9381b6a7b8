"""`btrm plan`: per-GPU memory and wall-clock of a recipe, before renting the GPUs.

    btrm plan --config configs/skywork-reward-v2/llama-3.1-8b.yaml --gpus 8 --nodes 8 --gpu-memory 80 \\
              --dataset-pairs 26000000 --mean-pair-tokens 2400 [--tokens-per-sec-per-gpu 9000] [--json]

`--gpus` is GPUs per node, `--nodes` the node count; data parallelism runs over all of them. Memory is in GiB.
The model shape comes from `--arch` (built-in sizes of the Skywork-Reward-V2 bases, no download), else from the
recipe's model id when it is one of those bases, else from `AutoConfig` of the model path.

Model states (bytes per parameter; P params, N data-parallel GPUs, L = params of the largest leaf module), bf16
mixed precision with Adam, as DeepSpeed lays them out for the DeepSpeed config btrm builds (bf16 with fp32 gradient
accumulation for ZeRO >= 1, btrm.train.ds_config):
  stage 0  2 bf16 params + 2 bf16 grads + 4 fp32 grads + 12 Adam (fp32 master, m, v), all replicated  = 20 P
  stage 1  2 bf16 params + 4 fp32 grad accumulator, replicated (DeepSpeed's BF16_Optimizer); 12 Adam / N
           offload_optimizer: GPU keeps the 2 + 4; the 16 / N optimizer side goes to host memory
  stage 2  2 bf16 params replicated; (4 fp32 grads + 12 Adam) / N
           offload_optimizer: GPU 2 P; host (4 + 12) / N per GPU
  stage 3  (2 bf16 params + 4 fp32 grads + 12 Adam) / N + 4 L (bf16 param and grad of the gathered largest layer)
           offload_optimizer: GPU 2 P / N + 4 L, host 16 / N per GPU; + offload_param: GPU 4 L, host 18 / N
These match DeepSpeed's own estimators (estimate_zero2/zero3_model_states_mem_needs) for stages 2 and 3; fp32
training (model.dtype fp32) uses 4 params + 4 grads + 8 Adam with the same partitioning.

Activations, for one packed micro-batch of T = data.max_tokens tokens (the packed forward is one row), bf16,
flash-attention-style kernels (no T x T score matrix is kept; attention stores q, k, v, its output and an fp32
log-sum-exp). Per token and decoder layer, the tensors autograd saves in a Llama/Qwen3 layer of transformers:
  A_layer = 2 * (4 H + 2 q + 2 kv + 4 I) + 2 * 4 H + 4 heads   [+ 6 (q + kv) for Qwen3's q/k RMSNorm]
  (bf16: two RMSNorm outputs before and after their weight, q/k/v after RoPE, attention output, SwiGLU gate, up,
  act(gate) and product; fp32: the RMSNorm input each norm upcasts; q = heads * head_dim, kv = kv_heads * head_dim,
  I = intermediate size)
  A_top = 8 H + 16  (final norm, score-head input, token and position ids)
  without checkpointing: T * (layers * A_layer + A_top)
  with gradient checkpointing (one checkpoint per decoder layer): T * (layers * 2 H + A_layer + A_top): the layer
  inputs are kept and one layer's activations are rebuilt at a time in backward.
Plus a backward working set of T * 2 * (2 H + 2 I) (the gradients flowing through one layer) and, per stage,
DeepSpeed's communication buckets at the sizes btrm.train.ds_config sets. A fixed 2 GiB covers the CUDA context,
NCCL and allocator slack. The estimate errs on the side of caution; measure the first steps before a long run:
on CUDA the trainer logs rank 0's `peak_memory_gib` per step (`torch.cuda.max_memory_allocated`).

Time: a step is `train.global_batch_pairs` pairs of `--mean-pair-tokens` tokens (from `btrm data stats`). Without a
measured `--tokens-per-sec-per-gpu` we assume 35% MFU of 989 TFLOP/s (H100/H200 dense bf16; torchtitan reports 33-39%
for Llama-3.1-8B on 8 H100s) with FLOPs per token from btrm.flops (6 N + attention over segments of half a pair).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from btrm.config import Config, load_config
from btrm.errors import UserError
from btrm.train.ds_config import PREFETCH_BUCKET_ZERO3, REDUCE_BUCKET, REDUCE_BUCKET_ZERO3

GiB = 2**30
OVERHEAD_GIB = 2.0  # CUDA context, NCCL, allocator slack
ASSUMED_MFU = 0.35
ASSUMED_PEAK_FLOPS = 989e12  # H100/H200 dense bf16 (btrm.flops.PEAK_BF16)
PACKING_FILL = 0.98  # best-fit-decreasing fill of a micro-batch (docs/design.md: >= 99% on long-tailed lengths)


@dataclass(frozen=True)
class Arch:
    """Decoder shape: all a parameter count and an activation estimate need."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_word_embeddings: bool  # irrelevant to the reward model (no LM head) but part of the base's identity
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k


ARCHS = {
    "llama-3.1-8b": Arch(4096, 32, 32, 8, 128, 14336, 128256, False),
    "llama-3.2-1b": Arch(2048, 16, 32, 8, 64, 8192, 128256, True),
    "llama-3.2-3b": Arch(3072, 28, 24, 8, 128, 8192, 128256, True),
    "qwen3-0.6b": Arch(1024, 28, 16, 8, 128, 3072, 151936, True, qk_norm=True),
    "qwen3-1.7b": Arch(2048, 28, 16, 8, 128, 6144, 151936, True, qk_norm=True),
    "qwen3-4b": Arch(2560, 36, 32, 8, 128, 9728, 151936, True, qk_norm=True),
    "qwen3-8b": Arch(4096, 36, 32, 8, 128, 12288, 151936, False, qk_norm=True),
}
HUB_IDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b", "Qwen/Qwen3-0.6B": "qwen3-0.6b",
    "Qwen/Qwen3-1.7B": "qwen3-1.7b", "Qwen/Qwen3-4B": "qwen3-4b", "Qwen/Qwen3-8B": "qwen3-8b",
}


def arch_from_hf_config(c) -> Arch:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Arch(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, c.intermediate_size,
                c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)),
                qk_norm=getattr(c, "model_type", "") in ("qwen3", "qwen3_moe"))


def resolve_arch(name_or_path: str, arch: str | None = None) -> tuple[Arch, str]:
    """(shape, where it came from)."""
    if arch:
        if arch not in ARCHS:
            raise ValueError(f"unknown --arch {arch!r}; built in: {', '.join(ARCHS)}")
        return ARCHS[arch], f"built-in {arch}"
    if name_or_path in HUB_IDS:
        return ARCHS[HUB_IDS[name_or_path]], f"built-in {HUB_IDS[name_or_path]} ({name_or_path})"
    from transformers import AutoConfig

    return arch_from_hf_config(AutoConfig.from_pretrained(name_or_path)), f"AutoConfig of {name_or_path}"


# ----------------------------------------------------------------------------------------------------------------------
# Parameters and model states


def param_counts(a: Arch) -> dict[str, int]:
    """Reward model = embedding + decoder layers + final norm + score head (hidden -> 1, no bias); no LM head."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    attn = a.hidden * q + 2 * a.hidden * kv + q * a.hidden + (2 * a.head_dim if a.qk_norm else 0)
    layer = attn + 3 * a.hidden * a.intermediate + 2 * a.hidden
    embedding = a.vocab * a.hidden
    total = embedding + a.layers * layer + a.hidden + a.hidden
    # ZeRO-3 gathers one leaf module at a time: the embedding table or an MLP projection is the largest
    largest = max(embedding, a.hidden * a.intermediate, a.hidden * q)
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "per_layer": layer,
            "largest_layer": largest}


def model_state_bytes(params: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int = 1,
                      offload_optimizer: bool = False, offload_param: bool = False,
                      dtype: str = "bf16") -> dict[str, float]:
    """Per-GPU model states (params, grads, optimizer) and host memory per node, in bytes (see module docstring)."""
    n = gpus_per_node * nodes
    p = float(params)
    if dtype == "fp32":
        w, g32, g16, opt = 4, 4, 0, 8  # no master copy, no bf16 grads
    else:
        w, g32, g16, opt = 2, 4, 2, 12
    gpu: dict[str, float]
    host = 0.0  # per GPU
    if stage == 0:
        gpu = {"params": w * p, "grads": (g16 + g32) * p, "optimizer": opt * p}
    elif stage == 1:
        if offload_optimizer:
            gpu = {"params": w * p, "grads": g32 * p, "optimizer": 0.0}
            host = (g32 + opt) * p / n
        else:
            gpu = {"params": w * p, "grads": g32 * p, "optimizer": opt * p / n}
    elif stage == 2:
        if offload_optimizer:
            gpu = {"params": w * p, "grads": 0.0, "optimizer": 0.0}
            host = (g32 + opt) * p / n
        else:
            gpu = {"params": w * p, "grads": g32 * p / n, "optimizer": opt * p / n}
    elif stage == 3:
        gathered = (w + (g16 or g32)) * largest_layer  # the largest layer's params and grads, gathered
        if offload_param:
            gpu = {"params": gathered, "grads": 0.0, "optimizer": 0.0}
            host = (w + g32 + opt) * p / n
        elif offload_optimizer:
            gpu = {"params": w * p / n + gathered, "grads": 0.0, "optimizer": 0.0}
            host = (g32 + opt) * p / n
        else:
            gpu = {"params": w * p / n + gathered, "grads": g32 * p / n, "optimizer": opt * p / n}
    else:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    gpu["total"] = sum(gpu.values())
    return {**{f"gpu_{k}": v for k, v in gpu.items()}, "host_per_node": host * gpus_per_node}


def comm_buffer_bytes(stage: int, offload_optimizer: bool) -> float:
    """DeepSpeed buckets at the sizes btrm.train.ds_config sets (a reduce bucket below stage 3; at stage 3 a
    smaller reduce bucket and a prefetch bucket), bf16, the reduce bucket double-buffered when communication
    overlaps."""
    if stage == 2 or (stage == 1 and offload_optimizer):
        return 2 * 2 * REDUCE_BUCKET
    if stage == 3:
        return 2 * 2 * REDUCE_BUCKET_ZERO3 + 2 * PREFETCH_BUCKET_ZERO3
    return 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Activations


def activation_bytes(a: Arch, tokens: int, checkpointing: bool) -> dict[str, float]:
    """Saved activations and backward working set of one packed micro-batch of `tokens` tokens (module docstring)."""
    q, kv, h, i = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.hidden, a.intermediate
    per_layer = 2 * (4 * h + 2 * q + 2 * kv + 4 * i) + 2 * 4 * h + 4 * a.heads + (6 * (q + kv) if a.qk_norm else 0)
    top = 8 * h + 16
    saved = a.layers * 2 * h + per_layer + top if checkpointing else a.layers * per_layer + top
    work = 2 * (2 * h + 2 * i)
    return {"saved": float(tokens * saved), "working": float(tokens * work), "total": float(tokens * (saved + work)),
            "per_token_per_layer": float(per_layer)}


# ----------------------------------------------------------------------------------------------------------------------
# Plan


@dataclass
class Setting:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    checkpointing: bool
    max_tokens: int

    def label(self) -> str:
        off = "+".join(x for x, on in (("opt", self.offload_optimizer), ("param", self.offload_param)) if on)
        return (f"ZeRO-{self.stage}" + (f" offload {off}" if off else "")
                + (" +ckpt" if self.checkpointing else "") + f" @ {self.max_tokens:,} tok")


def memory(a: Arch, counts: dict, s: Setting, gpus: int, nodes: int, dtype: str) -> dict[str, float]:
    states = model_state_bytes(counts["total"], counts["largest_layer"], s.stage, gpus, nodes, s.offload_optimizer,
                               s.offload_param, dtype)
    act = activation_bytes(a, s.max_tokens, s.checkpointing)
    buffers = comm_buffer_bytes(s.stage, s.offload_optimizer)
    total = states["gpu_total"] + act["total"] + buffers + OVERHEAD_GIB * GiB
    return {"model_states": states["gpu_total"], "params": states["gpu_params"], "grads": states["gpu_grads"],
            "optimizer": states["gpu_optimizer"], "activations": act["total"], "comm_buffers": buffers,
            "overhead": OVERHEAD_GIB * GiB, "total": total, "host_per_node": states["host_per_node"]}


def alternatives(a: Arch, counts: dict, cur: Setting, gpus: int, nodes: int, dtype: str, limit: float) -> list[str]:
    """Plain suggestions that make it fit, nearest change first."""
    fits = lambda s, g=gpus, n=nodes: memory(a, counts, s, g, n, dtype)["total"] <= limit  # noqa: E731
    out = []
    if not cur.checkpointing and fits(replace(cur, checkpointing=True)):
        out.append("turn on gradient checkpointing (--model.gradient_checkpointing=true; ~30% more compute)")
    for stage in range(cur.stage + 1, 4):
        s = replace(cur, stage=stage)
        if fits(s):
            out.append(f"use ZeRO stage {stage} (--deepspeed.zero_stage={stage})")
            break
        if fits(replace(s, checkpointing=True)):
            out.append(f"use ZeRO stage {stage} with gradient checkpointing")
            break
    stage = max(cur.stage, 1)
    s = replace(cur, stage=stage, offload_optimizer=True)
    if not cur.offload_optimizer and fits(s):
        out.append("offload the optimizer to CPU (--deepspeed.offload_optimizer=true"
                   + (f" --deepspeed.zero_stage={stage}" if stage != cur.stage else "") + "; slower steps, needs "
                   f"{memory(a, counts, s, gpus, nodes, dtype)['host_per_node'] / GiB:,.0f} GiB host memory per node)")
    s = replace(cur, stage=3, offload_optimizer=True, offload_param=True)
    if not cur.offload_param and fits(s):
        out.append("ZeRO-3 with parameter and optimizer offload (--deepspeed.zero_stage=3 "
                   "--deepspeed.offload_optimizer=true --deepspeed.offload_param=true; much slower)")
    lo, hi = 0, cur.max_tokens  # largest max_tokens that fits, in steps of 1024
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024 or 1024
        lo, hi = (mid, hi) if fits(replace(cur, max_tokens=mid)) else (lo, mid)
    if lo >= 1024 and fits(replace(cur, max_tokens=lo)):
        out.append(f"lower data.max_tokens to {lo:,} (--data.max_tokens={lo}); pairs longer than that are dropped "
                   "or prompt-truncated (data.overlong)")
    if cur.stage >= 1:
        for total_gpus in (2**k for k in range(1, 15)):
            if total_gpus > gpus * nodes and fits(cur, total_gpus, 1):
                out.append(f"more GPUs: {total_gpus} in all partitions the optimizer states enough")
                break
    return out


def plan(cfg: Config, a: Arch, gpus: int, nodes: int, gpu_memory_gib: float, tokens_per_sec: float | None = None,
         dataset_pairs: int | None = None, mean_pair_tokens: float | None = None) -> dict[str, Any]:
    counts = param_counts(a)
    dtype = "fp32" if cfg.model.dtype == "fp32" else "bf16"
    ds = cfg.deepspeed
    cur = Setting(ds.zero_stage, ds.offload_optimizer, ds.offload_param, cfg.model.gradient_checkpointing,
                  cfg.data.max_tokens)
    limit = gpu_memory_gib * GiB
    mem = memory(a, counts, cur, gpus, nodes, dtype)
    table = []
    for stage, oo, op in ((0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False),
                          (3, False, False), (3, True, False), (3, True, True)):
        row = {"stage": stage, "offload_optimizer": oo, "offload_param": op}
        for ckpt in (False, True):
            m = memory(a, counts, replace(cur, stage=stage, offload_optimizer=oo, offload_param=op,
                                          checkpointing=ckpt), gpus, nodes, dtype)
            row["ckpt" if ckpt else "no_ckpt"] = m["total"] / GiB
        row["model_states"] = m["model_states"] / GiB
        row["host_per_node"] = m["host_per_node"] / GiB
        table.append(row)
    result: dict[str, Any] = {
        "arch": asdict(a), "params": counts, "gpus_per_node": gpus, "nodes": nodes, "gpu_memory_gib": gpu_memory_gib,
        "dtype": dtype, "setting": asdict(cur), "label": cur.label(),
        "memory_gib": {k: v / GiB for k, v in mem.items()},
        "activations_gib": {"no_ckpt": activation_bytes(a, cur.max_tokens, False)["total"] / GiB,
                            "ckpt": activation_bytes(a, cur.max_tokens, True)["total"] / GiB},
        "fits": mem["total"] <= limit, "options": table, "suggestions": [],
    }
    if not result["fits"]:
        result["suggestions"] = alternatives(a, counts, cur, gpus, nodes, dtype, limit)
    if cfg.data.max_tokens < 2 * cfg.data.max_length:
        result["note_max_tokens"] = (f"data.max_tokens {cfg.data.max_tokens:,} < 2 x max_length: pairs with more "
                                     f"than {cfg.data.max_tokens:,} tokens in all follow data.overlong")
    result["time"] = time_estimate(cfg, a, counts, gpus * nodes, tokens_per_sec, dataset_pairs, mean_pair_tokens)
    return result


def time_estimate(cfg: Config, a: Arch, counts: dict, world: int, tokens_per_sec: float | None,
                  dataset_pairs: int | None, mean_pair_tokens: float | None) -> dict[str, Any]:
    from btrm.flops import train_flops

    t: dict[str, Any] = {"global_batch_pairs": cfg.train.global_batch_pairs}
    if dataset_pairs:
        t["steps_per_epoch"] = math.ceil(dataset_pairs / cfg.train.global_batch_pairs)
        t["total_steps"] = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * t["steps_per_epoch"]))
    if not mean_pair_tokens:
        t["note"] = "pass --mean-pair-tokens (from `btrm data stats`) for tokens per step and wall-clock"
        return t
    tokens_step = cfg.train.global_batch_pairs * mean_pair_tokens
    t["tokens_per_step"] = tokens_step
    t["micro_steps_per_gpu"] = math.ceil(tokens_step / (world * cfg.data.max_tokens * PACKING_FILL))
    if tokens_per_sec:
        t["tokens_per_sec_per_gpu"], t["throughput_source"] = tokens_per_sec, "measured (--tokens-per-sec-per-gpu)"
    else:
        seg = max(1, round(mean_pair_tokens / 2))  # attention runs per conversation: half a pair
        flops_per_token = train_flops(counts["non_embedding"], a.layers, a.heads, a.head_dim, [seg]) / seg
        t["tokens_per_sec_per_gpu"] = ASSUMED_MFU * ASSUMED_PEAK_FLOPS / flops_per_token
        t["throughput_source"] = (f"assumed: {ASSUMED_MFU:.0%} MFU of {ASSUMED_PEAK_FLOPS / 1e12:.0f} TFLOP/s; "
                                  "measure a few steps and pass --tokens-per-sec-per-gpu")
    t["seconds_per_step"] = tokens_step / (t["tokens_per_sec_per_gpu"] * world)
    if "total_steps" in t:
        t["hours"] = t["total_steps"] * t["seconds_per_step"] / 3600
        t["gpu_hours"] = t["hours"] * world
    return t


# ----------------------------------------------------------------------------------------------------------------------
# Output


def format_plan(r: dict, source: str) -> str:
    m, p = r["memory_gib"], r["params"]
    lines = [f"model: {source}; reward model {p['total'] / 1e9:.2f}B params "
             f"({p['non_embedding'] / 1e9:.2f}B non-embedding), {r['dtype']}",
             f"cluster: {r['nodes']} node(s) x {r['gpus_per_node']} GPU(s), {r['gpu_memory_gib']:g} GiB each",
             f"recipe: {r['label']}", "",
             "per-GPU memory (GiB)",
             f"  params {m['params']:8.2f}   grads {m['grads']:8.2f}   optimizer {m['optimizer']:8.2f}"
             f"   = model states {m['model_states']:.2f}",
             f"  activations {m['activations']:.2f} (gradient checkpointing {'on' if r['setting']['checkpointing'] else 'off'}; "
             f"off: {r['activations_gib']['no_ckpt']:.2f}, on: {r['activations_gib']['ckpt']:.2f})",
             f"  comm buffers {m['comm_buffers']:.2f}   overhead {m['overhead']:.2f}",
             f"  total {m['total']:.2f} of {r['gpu_memory_gib']:g}"
             + (f"; host memory for offload {m['host_per_node']:.0f} GiB per node" if m["host_per_node"] else "")]
    if r["fits"]:
        lines.append(f"  FITS, {r['gpu_memory_gib'] - m['total']:.1f} GiB to spare")
    else:
        lines.append(f"  WILL NOT FIT: {m['total'] - r['gpu_memory_gib']:.1f} GiB over. What would fit:")
        lines += [f"    - {s}" for s in r["suggestions"]] or ["    - nothing on this cluster: more or larger GPUs"]
    if "note_max_tokens" in r:
        lines.append(f"  note: {r['note_max_tokens']}")
    lines += ["", "all settings at this max_tokens (GiB per GPU; * = fits)",
              "  ZeRO  offload        model states   no ckpt     ckpt   host/node"]
    for row in r["options"]:
        off = "+".join(x for x, on in (("opt", row["offload_optimizer"]), ("param", row["offload_param"])) if on) or "-"
        mark = lambda v: f"{v:8.1f}{'*' if v <= r['gpu_memory_gib'] else ' '}"  # noqa: E731
        lines.append(f"  {row['stage']:>4}  {off:<12} {row['model_states']:12.1f} {mark(row['no_ckpt'])} "
                     f"{mark(row['ckpt'])} {row['host_per_node']:9.0f}")
    t = r["time"]
    lines += ["", "time"]
    if "steps_per_epoch" in t:
        lines.append(f"  {t['steps_per_epoch']:,} steps per epoch of {t['global_batch_pairs']:,} pairs; "
                     f"{t['total_steps']:,} steps in the run")
    else:
        lines.append("  pass --dataset-pairs for steps per epoch")
    if "note" in t:
        lines.append(f"  {t['note']}")
    else:
        lines.append(f"  {t['tokens_per_step']:,.0f} tokens per step, ~{t['micro_steps_per_gpu']} micro-batches per GPU")
        lines.append(f"  {t['tokens_per_sec_per_gpu']:,.0f} tokens/s per GPU ({t['throughput_source']})")
        lines.append(f"  {t['seconds_per_step']:.1f} s per step"
                     + (f"; {t['hours']:.1f} h for the run ({t['gpu_hours']:,.0f} GPU-hours)" if "hours" in t else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (model, data.max_tokens, deepspeed, batch)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU, GiB (H100: 80)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="built-in model shape instead of reading the config")
    parser.add_argument("--tokens-per-sec-per-gpu", type=float, help="measured training throughput")
    parser.add_argument("--dataset-pairs", type=int, help="pairs in the training set (btrm data stats)")
    parser.add_argument("--mean-pair-tokens", type=float, help="mean chosen+rejected tokens (btrm data stats)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, validate=False)  # a ConfigError ends in one line (btrm.cli)
    try:
        a, source = resolve_arch(cfg.model.name_or_path, args.arch)
    except (ValueError, OSError) as e:  # AutoConfig could not read the model path (offline, typo)
        raise UserError(f"cannot read the model shape of {cfg.model.name_or_path!r}: {e}; "
                        f"pass --arch with one of: {', '.join(ARCHS)}") from e
    r = plan(cfg, a, args.gpus, args.nodes, args.gpu_memory, args.tokens_per_sec_per_gpu, args.dataset_pairs,
             args.mean_pair_tokens)
    r["arch_source"] = source
    print(json.dumps(r, indent=2) if args.json else format_plan(r, source))
    return 0
