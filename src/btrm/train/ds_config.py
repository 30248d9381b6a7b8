"""The DeepSpeed config dict, built from the typed config in one place."""

from __future__ import annotations

import copy
import logging

import torch

from btrm.config import Config

log = logging.getLogger(__name__)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Config, world_size: int, dtype: torch.dtype, device_type: str) -> dict:
    """One micro-batch = one packed row; accumulation boundaries are set by the loop (micro-steps vary per step),
    so DeepSpeed's own gradient_accumulation_steps stays 1 and its loss division never applies."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device_type == "cuda",
                    reduce_bucket_size=5e8 if ds.zero_stage < 3 else 5e7)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e4,
                    stage3_prefetch_bucket_size=5e7)
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16 and ds.zero_stage >= 1:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dtype == torch.bfloat16:  # DeepSpeed has no fp32 accumulation without ZeRO (it raises for that mix)
        log.warning("deepspeed.zero_stage=0 with bf16 accumulates gradients in bf16 (DeepSpeed's DDP_BFLOAT16 "
                    "path), losing precision over micro-steps: use deepspeed.zero_stage >= 1")
    return _merge(out, ds.extra)
