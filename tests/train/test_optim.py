"""The lr schedule and the DeepSpeed config against hand-computed values."""

import pytest
import torch

from btrm.config import Config, OptimConfig
from btrm.train.ds_config import build_ds_config
from btrm.train.optim import lr_factor, warmup_steps


@pytest.mark.parametrize("step,total,warmup,kind,min_ratio,expect", [
    (0, 10, 4, "constant", 0.0, 0.25),  # warmup: (step + 1) / warmup
    (3, 10, 4, "linear", 0.0, 1.0),
    (7, 10, 4, "constant", 0.0, 1.0),
    (0, 10, 0, "linear", 0.1, 1.0),  # progress 0
    (5, 10, 0, "linear", 0.1, 0.55),  # 0.1 + 0.9 * (1 - 0.5)
    (10, 10, 0, "linear", 0.1, 0.1),
    (12, 10, 0, "linear", 0.1, 0.1),  # past the end: held at the floor
    (6, 10, 2, "linear", 0.0, 0.5),  # progress (6 - 2) / (10 - 2)
    (2, 10, 2, "cosine", 0.0, 1.0),
    (6, 10, 2, "cosine", 0.0, 0.5),  # 0.5 * (1 + cos(pi / 2))
    (6, 10, 2, "cosine", 0.2, 0.6),  # 0.2 + 0.8 * 0.5
    (10, 10, 2, "cosine", 0.2, 0.2),
])
def test_lr_factor(step, total, warmup, kind, min_ratio, expect):
    assert lr_factor(step, total, warmup, kind, min_ratio) == pytest.approx(expect, abs=1e-12)


def test_warmup_steps_from_ratio_unless_given():
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 30) == 3
    assert warmup_steps(OptimConfig(warmup_steps=5, warmup_ratio=0.1), 30) == 5


def test_ds_config_zero2_bf16_cuda():
    cfg = Config()
    cfg.deepspeed.zero_stage = 2
    assert build_ds_config(cfg, 4, torch.bfloat16, "cuda") == {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                              "reduce_bucket_size": 5e8},
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False, "data_types": {"grad_accum_dtype": "fp32"}}


def test_ds_config_zero3_offload_fp32_cpu_with_extra():
    cfg = Config()
    cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param = 3, True, True
    cfg.optim.grad_clip = 0.0
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 1e6}, "steps_per_print": 5}
    out = build_ds_config(cfg, 2, torch.float32, "cpu")
    assert out == {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_bucket_size": 1e6,  # from extra; the rest of the section stays
                              "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "offload_param": {"device": "cpu", "pin_memory": False},
                              "stage3_gather_16bit_weights_on_model_save": True,
                              "stage3_param_persistence_threshold": 1e4, "stage3_prefetch_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 5, "wall_clock_breakdown": False}
    assert cfg.deepspeed.extra == {"zero_optimization": {"reduce_bucket_size": 1e6}, "steps_per_print": 5}
