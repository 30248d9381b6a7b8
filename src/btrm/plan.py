"""`btrm plan`: per-GPU memory and wall-clock of a recipe, before renting the GPUs.

    btrm plan --config configs/skywork-reward-v2/llama-3.1-8b.yaml --gpus 8 --nodes 8 --gpu-memory 80 \\
              --dataset-pairs 26000000 --mean-pair-tokens 2400 [--tokens-per-sec-per-gpu 9000] [--json] \\
              [--section.key=value ...]   # overrides as in train.py, e.g. --data.max_length=131072

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
LoRA (model.lora.r > 0): every param keeps its weight (2 bytes, or 0.5625 for QLoRA's 4-bit NF4 with double
quantization), while grads and Adam states are those of the trainable params only: r * (in + out) per targeted
Linear of every layer plus the score head (`lora_params`, the count peft reports).

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
NCCL and allocator slack.

Sequence parallelism (train.sequence_parallel_size = SP > 1, DeepSpeed's Ulysses `UlyssesSPAttentionHF`): an SP
group of ranks shares one packed row of data.max_tokens x SP tokens, each rank holding T = data.max_tokens of them.
Outside attention every tensor above is per token, so a rank's activations are those of T tokens. Inside attention
an all-to-all swaps the split: each rank attends over the whole row with heads / SP query heads and
max(kv_heads / SP, 1) key/value heads (kv heads are replicated when SP > kv_heads), the same bytes as T tokens of
all heads except (per token and layer, measured against the tensors autograd saves under the real wrapper):
  + 2 q                       the kernel's output at full row length, now a separate tensor from o_proj's input
  + 2 * 2 * (kv_sp - kv)      k and v of replicated kv heads, kv_sp = max(kv_heads, SP) * head_dim
and the backward working set gains the send and receive copies of one layer's q, k, v and output,
2 * 2 * (2 q + 2 kv_sp) per token. Model states do not change: DeepSpeed partitions ZeRO states and reduces
gradients over its sequence-data-parallel group, all SP x DP ranks (the engine passes that group to the ZeRO
optimizers as their data-parallel group), so they are split over the whole world as without SP.
Ulysses needs SP to divide the attention heads, and kv_heads and SP to divide one another; btrm also needs SP to
divide the world. `btrm plan` recommends the smallest such SP at which a pair of two data.max_length conversations
fits in GPU memory: a row of 2 x max_length tokens, 2 x max_length / SP per rank.

The estimate errs on the side of caution; measure the first steps before a long run: on CUDA the trainer logs rank
0's `peak_memory_gib` per step (`torch.cuda.max_memory_allocated`).

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

from btrm.config import Config, load_config, sp_heads_error
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
    max_positions: int | None = None  # max_position_embeddings of the base: longer runs extrapolate RoPE


ARCHS = {
    "llama-3.1-8b": Arch(4096, 32, 32, 8, 128, 14336, 128256, False, max_positions=131072),
    "llama-3.2-1b": Arch(2048, 16, 32, 8, 64, 8192, 128256, True, max_positions=131072),
    "llama-3.2-3b": Arch(3072, 28, 24, 8, 128, 8192, 128256, True, max_positions=131072),
    "qwen3-0.6b": Arch(1024, 28, 16, 8, 128, 3072, 151936, True, qk_norm=True, max_positions=40960),
    "qwen3-1.7b": Arch(2048, 28, 16, 8, 128, 6144, 151936, True, qk_norm=True, max_positions=40960),
    "qwen3-4b": Arch(2560, 36, 32, 8, 128, 9728, 151936, True, qk_norm=True, max_positions=40960),
    "qwen3-8b": Arch(4096, 36, 32, 8, 128, 12288, 151936, False, qk_norm=True, max_positions=40960),
}
HUB_IDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b", "Qwen/Qwen3-0.6B": "qwen3-0.6b",
    "Qwen/Qwen3-1.7B": "qwen3-1.7b", "Qwen/Qwen3-4B": "qwen3-4b", "Qwen/Qwen3-8B": "qwen3-8b",
}


def arch_from_hf_config(c) -> Arch:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    positions = getattr(c, "max_position_embeddings", None)
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if positions and rope.get("rope_type") == "yarn" and rope.get("original_max_position_embeddings"):
        positions = max(positions, int(rope["factor"] * rope["original_max_position_embeddings"]))
    return Arch(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, c.intermediate_size,
                c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)),
                qk_norm=getattr(c, "model_type", "") in ("qwen3", "qwen3_moe"),
                max_positions=positions)


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
                      dtype: str = "bf16", trainable: int | None = None,
                      weight_bytes: float | None = None) -> dict[str, float]:
    """Per-GPU model states (params, grads, optimizer) and host memory per node, in bytes (see module docstring).

    LoRA: `trainable` params (adapters + score head) carry grads and optimizer state, all `params` (frozen base
    included) their weights at `weight_bytes` each (0.5625 for QLoRA's 4-bit NF4 with double quantization)."""
    n = gpus_per_node * nodes
    if dtype == "fp32":
        w, g32, g16, opt = 4, 4, 0, 8  # no master copy, no bf16 grads
    else:
        w, g32, g16, opt = 2, 4, 2, 12
    if trainable is not None:  # weights of all params; gradients and optimizer states of the trainable ones only
        scale = float(trainable) / params
        w = (weight_bytes or w) * params / trainable
        params = trainable
        largest_layer = largest_layer * scale
    p = float(params)
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


def activation_bytes(a: Arch, tokens: int, checkpointing: bool, sp: int = 1) -> dict[str, float]:
    """Saved activations and backward working set of one rank's `tokens` tokens of a packed micro-batch, the row
    split over `sp` ranks by Ulysses (module docstring)."""
    q, kv, h, i = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.hidden, a.intermediate
    per_layer = 2 * (4 * h + 2 * q + 2 * kv + 4 * i) + 2 * 4 * h + 4 * a.heads + (6 * (q + kv) if a.qk_norm else 0)
    work = 2 * (2 * h + 2 * i)
    if sp > 1:
        kv_sp = max(a.kv_heads, sp) * a.head_dim
        per_layer += 2 * q + 2 * 2 * (kv_sp - kv)
        work += 2 * 2 * (2 * q + 2 * kv_sp)
    top = 8 * h + 16
    saved = a.layers * 2 * h + per_layer + top if checkpointing else a.layers * per_layer + top
    return {"saved": float(tokens * saved), "working": float(tokens * work), "total": float(tokens * (saved + work)),
            "per_token_per_layer": float(per_layer)}


# ----------------------------------------------------------------------------------------------------------------------
# Plan


def sp_layout_error(a: Arch, sp: int, world: int) -> str | None:
    """Why `sp` ranks cannot split this model's rows among `world` GPUs (Ulysses' head rules), else None."""
    key = f"train.sequence_parallel_size {sp}"
    if sp < 1:
        return f"{key} must be >= 1"
    if world % sp:
        return f"{key} does not divide the {world} GPUs"
    why = sp_heads_error(sp, a.heads, a.kv_heads)
    return f"{key}: {why}" if why else None


@dataclass
class Setting:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    checkpointing: bool
    max_tokens: int  # per rank: an SP group's row holds max_tokens x sp tokens
    sp: int = 1

    def label(self) -> str:
        off = "+".join(x for x, on in (("opt", self.offload_optimizer), ("param", self.offload_param)) if on)
        split = (f", SP {self.sp} @ {self.max_tokens:,} tok per rank ({self.max_tokens * self.sp:,} per row)"
                 if self.sp > 1 else f" @ {self.max_tokens:,} tok")
        return (f"ZeRO-{self.stage}" + (f" offload {off}" if off else "") + (" +ckpt" if self.checkpointing else "")
                + split)


def memory(a: Arch, counts: dict, s: Setting, gpus: int, nodes: int, dtype: str) -> dict[str, float]:
    # SP leaves model states alone: DeepSpeed partitions them over all SP x DP ranks (module docstring)
    states = model_state_bytes(counts["total"], counts["largest_layer"], s.stage, gpus, nodes, s.offload_optimizer,
                               s.offload_param, dtype, counts.get("trainable"), counts.get("weight_bytes"))
    act = activation_bytes(a, s.max_tokens, s.checkpointing, s.sp)
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
    row, world = cur.max_tokens * cur.sp, gpus * nodes
    for sp in range(cur.sp + 1, world + 1):  # the same rows split over more ranks
        s = replace(cur, sp=sp, max_tokens=-(-row // sp))
        if sp_layout_error(a, sp, world) is None and fits(s):
            out.append(f"sequence parallelism: split each {row:,}-token row over {sp} GPUs "
                       f"(--train.sequence_parallel_size={sp} --data.max_tokens={s.max_tokens})")
            break
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


def recommend_sp(a: Arch, counts: dict, cur: Setting, gpus: int, nodes: int, dtype: str, limit: float,
                 max_length: int) -> dict[str, Any]:
    """Per-rank memory for each SP that divides the world, when one row holds a pair of two `max_length`
    conversations (2 x max_length tokens, 2 x max_length / SP per rank), at the recipe's ZeRO and checkpointing
    settings; `recommended` is the smallest SP that fits, None if none does."""
    world = gpus * nodes
    row = 2 * max_length
    rows = []
    for sp in (d for d in range(1, world + 1) if world % d == 0):
        per_rank = -(-row // sp)  # the row is padded to a multiple of SP
        entry: dict[str, Any] = {"sp": sp, "row_tokens": per_rank * sp, "tokens_per_rank": per_rank,
                                 "error": sp_layout_error(a, sp, world)}
        if entry["error"] is None:
            s = replace(cur, sp=sp, max_tokens=per_rank)
            m = memory(a, counts, s, gpus, nodes, dtype)
            entry.update({"activation_bytes_per_token": activation_bytes(a, 1, s.checkpointing, sp)["total"],
                          **{f"{k}_gib": m[k] / GiB for k in ("activations", "model_states", "comm_buffers",
                                                               "overhead", "total")},
                          "fits": m["total"] <= limit})
        rows.append(entry)
    return {"max_length": max_length, "row_tokens": row, "candidates": rows,
            "recommended": next((e["sp"] for e in rows if e.get("fits")), None)}


def lora_params(a: Arch, r: int, target_modules: list[str]) -> int:
    """Adapter params r * (in + out) per targeted Linear of every layer, plus the fully trained score head."""
    q, kv, h, i = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.hidden, a.intermediate
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}
    return a.layers * sum(r * sum(dims[m]) for m in target_modules if m in dims) + h


def plan(cfg: Config, a: Arch, gpus: int, nodes: int, gpu_memory_gib: float, tokens_per_sec: float | None = None,
         dataset_pairs: int | None = None, mean_pair_tokens: float | None = None) -> dict[str, Any]:
    counts = param_counts(a)
    lo = cfg.model.lora
    if lo.r > 0:  # LoRA: grads and optimizer states of the adapters and head only; QLoRA stores the base in 4 bits
        counts["trainable"] = lora_params(a, lo.r, lo.target_modules)
        if lo.load_in_4bit:
            counts["weight_bytes"] = 0.5625
    dtype = "fp32" if cfg.model.dtype == "fp32" else "bf16"
    ds = cfg.deepspeed
    sp = cfg.train.sequence_parallel_size
    error = sp_layout_error(a, sp, gpus * nodes)
    if error:
        raise UserError(error)
    cur = Setting(ds.zero_stage, ds.offload_optimizer, ds.offload_param, cfg.model.gradient_checkpointing,
                  cfg.data.max_tokens, sp)
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
        "activations_gib": {"no_ckpt": activation_bytes(a, cur.max_tokens, False, sp)["total"] / GiB,
                            "ckpt": activation_bytes(a, cur.max_tokens, True, sp)["total"] / GiB},
        "fits": mem["total"] <= limit, "options": table, "suggestions": [],
        "sequence_parallel": recommend_sp(a, counts, cur, gpus, nodes, dtype, limit, cfg.data.max_length),
    }
    if not result["fits"]:
        result["suggestions"] = alternatives(a, counts, cur, gpus, nodes, dtype, limit)
    row = cfg.data.max_tokens * sp
    if row < 2 * cfg.data.max_length:
        result["note_max_tokens"] = (f"a row of data.max_tokens {cfg.data.max_tokens:,}"
                                     + (f" x SP {sp} = {row:,}" if sp > 1 else "")
                                     + f" tokens < 2 x max_length: pairs with more than {row:,} tokens in all "
                                     "follow data.overlong")
    if a.max_positions and cfg.data.max_length > a.max_positions:
        result["note_positions"] = (f"data.max_length {cfg.data.max_length:,} > the base's {a.max_positions:,} "
                                    "positions (max_position_embeddings): RoPE runs past its trained range unless "
                                    "the base's config.json sets rope scaling (Qwen3: YaRN, factor 4 over 32,768)")
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
             f"({p['non_embedding'] / 1e9:.2f}B non-embedding), {r['dtype']}"
             + (f"; LoRA: {p['trainable'] / 1e6:.1f}M trainable ({100 * p['trainable'] / p['total']:.2f}%)"
                + (", base in 4-bit" if "weight_bytes" in p else "") if "trainable" in p else ""),
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
    lines += [f"  note: {r[k]}" for k in ("note_max_tokens", "note_positions") if k in r]
    lines += ["", "all settings at this max_tokens (GiB per GPU; * = fits)",
              "  ZeRO  offload        model states   no ckpt     ckpt   host/node"]
    for row in r["options"]:
        off = "+".join(x for x, on in (("opt", row["offload_optimizer"]), ("param", row["offload_param"])) if on) or "-"
        mark = lambda v: f"{v:8.1f}{'*' if v <= r['gpu_memory_gib'] else ' '}"  # noqa: E731
        lines.append(f"  {row['stage']:>4}  {off:<12} {row['model_states']:12.1f} {mark(row['no_ckpt'])} "
                     f"{mark(row['ckpt'])} {row['host_per_node']:9.0f}")
    spr = r["sequence_parallel"]
    if r["setting"]["sp"] > 1 or spr["recommended"] != 1:
        lines += [""] + format_sp(spr, r)
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


def format_sp(spr: dict, r: dict) -> list[str]:
    """The SP recommendation with its arithmetic, one line per SP."""
    cur = r["setting"]
    label = Setting(**{**cur, "sp": 1}).label().split(" @ ")[0]
    world = r["gpus_per_node"] * r["nodes"]
    lines = [f"sequence parallelism (Ulysses): a pair of two {spr['max_length']:,}-token conversations in one row of "
             f"2 x {spr['max_length']:,} = {spr['row_tokens']:,} tokens, split over SP GPUs",
             f"  at {label}; activations = tokens per rank x bytes per token; model states as above for any SP "
             f"(ZeRO partitions them over all {world} GPUs)",
             "    SP  tokens/rank  B/token  activations + model states + buffers + overhead =  total GiB"]
    for e in spr["candidates"]:
        if e["error"]:
            lines.append(f"  {e['sp']:>4}  refused: {e['error']}")
            continue
        lines.append(f"  {e['sp']:>4}  {e['tokens_per_rank']:>11,}  {e['activation_bytes_per_token']:>7,.0f}  "
                     f"{e['activations_gib']:>11.2f} + {e['model_states_gib']:>12.2f} + {e['comm_buffers_gib']:>7.2f}"
                     f" + {e['overhead_gib']:>8.2f} = {e['total_gib']:>6.1f}  "
                     + ("fits" if e["fits"] else f"over {r['gpu_memory_gib']:g}")
                     + (" (crosses nodes)" if e["sp"] > r["gpus_per_node"] else ""))
    rec = spr["recommended"]
    if rec is None:
        lines.append(f"  no SP fits at {label}: see the settings table above for a higher ZeRO stage or offload")
    else:
        per_rank = next(e["tokens_per_rank"] for e in spr["candidates"] if e["sp"] == rec)
        lines.append(f"  recommended: SP {rec}, the smallest that fits "
                     f"(--train.sequence_parallel_size={rec} --data.max_tokens={per_rank})")
    return lines


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
    parser.set_defaults(accepts_overrides=True)  # --section.key=value as in train.py, e.g. --data.max_length=131072


def run(args: argparse.Namespace) -> int:
    # a ConfigError ends in one line (btrm.cli); validate() is not called, the planner checks what it reads itself
    cfg = load_config(args.config, args.overrides, validate=False)
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
