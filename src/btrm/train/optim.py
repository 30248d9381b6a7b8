"""The optimizer and the learning-rate schedule, built from `optim.*`."""

from __future__ import annotations

import math

import torch

from btrm.config import Config, OptimConfig


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup over `warmup` steps (the first
    step gets 1/warmup), then constant, or linear / cosine decay to `min_ratio` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(o: OptimConfig, total: int) -> int:
    return o.warmup_steps or round(o.warmup_ratio * total)


def lr_scheduler(o: OptimConfig, total: int):
    """A builder for deepspeed.initialize: DeepSpeed hands it its wrapped optimizer, whose param groups ZeRO may
    have rewritten, so the schedule must be built on that one."""
    warmup = warmup_steps(o, total)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, o.scheduler, o.min_lr_ratio))

    return build


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device):
    """AdamW (no weight decay on norms and biases) or plain SGD over the trainable parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    # torch's fused AdamW on CUDA (no extension build needed), foreach on CPU
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)
