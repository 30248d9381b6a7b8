"""The DeepSpeed config dict, built from the typed config in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from btrm.config import Config, merge_dicts

if TYPE_CHECKING:
    import torch

# DeepSpeed communication buckets, in elements. `btrm plan` budgets GPU memory for exactly these.
REDUCE_BUCKET = 5e8  # ZeRO 1-2 gradient reduction
REDUCE_BUCKET_ZERO3 = 5e7  # ZeRO-3 gradient reduction
PREFETCH_BUCKET_ZERO3 = 5e7  # ZeRO-3 parameter prefetch

log = logging.getLogger(__name__)


def build_ds_config(cfg: Config, dp_size: int, dtype: torch.dtype, device_type: str) -> dict:
    """One micro-batch = one packed row; accumulation boundaries are set by the loop (micro-steps vary per step),
    so DeepSpeed's own gradient_accumulation_steps stays 1 and its loss division never applies."""
    import torch  # here, so that `btrm plan` reads the bucket sizes without importing torch

    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device_type == "cuda",
                    reduce_bucket_size=REDUCE_BUCKET if ds.zero_stage < 3 else REDUCE_BUCKET_ZERO3)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4,
                    stage3_prefetch_bucket_size=PREFETCH_BUCKET_ZERO3)
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dp_size,  # one packed row per data-parallel rank and micro-step
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if cfg.train.sequence_parallel_size > 1:  # read where DeepSpeed has no SP groups yet (ZeRO-3's partitioned load)
        out["sequence_parallel_size"] = cfg.train.sequence_parallel_size
        if ds.zero_stage == 3:  # ZeRO-3 then averages over every rank: the trainer's loss scale counts on it
            zero["reduce_scatter"] = True
    if dtype == torch.bfloat16 and ds.zero_stage >= 1:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dtype == torch.bfloat16:  # DeepSpeed has no fp32 accumulation without ZeRO (it raises for that mix)
        log.warning("deepspeed.zero_stage=0 with bf16 accumulates gradients in bf16 (DeepSpeed's DDP_BFLOAT16 "
                    "path), losing precision over micro-steps: use deepspeed.zero_stage >= 1")
    return merge_dicts(out, ds.extra)
