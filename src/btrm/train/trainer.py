"""The training loop: packed Bradley-Terry steps under DeepSpeed, eval, logging, checkpoints, exact resume."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import btrm
from btrm.builtin import resolve_builtins
from btrm.config import Config, dump_yaml, to_dict
from btrm.cpu import retain_freed_memory, share_cpu_threads
from btrm.data.dataset import PreparedData, StepSampler, TokenizedPairs, prepare_data, rank_micro_batches
from btrm.data.packing import assign_to_ranks, best_fit_decreasing, collate_pairs, packing_efficiency
from btrm.flops import model_shape, non_embedding_params, peak_flops, train_flops
from btrm.loss import bt_loss, finalize_metrics
from btrm.prefix_attention import sharing_mode
from btrm.modeling import (enable_activation_checkpointing, ensure_pad_token, load_reward_model, packed_rewards,
                           resolve_attn_implementation, resolve_dtype)
from btrm.train import checkpoint as ckpt
from btrm.train.ds_config import build_ds_config
from btrm.train.logger import build_logger

log = logging.getLogger("btrm")


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self._comm_device())
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> Dist:
    """Works under the deepspeed launcher, torchrun, and a plain `python train.py` (one process)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cpu_threads()
        retain_freed_memory()
    return Dist(rank, world, local_rank, device)


# ----------------------------------------------------------------------------------------------------------------------
# Components


class RewardWrapper(torch.nn.Module):
    """What DeepSpeed wraps: PackedBatch -> rewards per sequence."""

    def __init__(self, rm):
        super().__init__()
        self.rm = rm

    def forward(self, batch):
        return packed_rewards(self.rm, batch)


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device):
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


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    def __init__(self, cfg: Config):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.dist = setup_distributed()
        d = self.dist
        self.is_main = d.rank == 0
        self.pbar = None
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING, format="%(message)s")
        torch.manual_seed(cfg.train.seed)
        self.out = Path(cfg.train.output_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out)
        d.barrier()
        cfg = self.cfg_resolved = resolve_builtins(cfg, self.is_main, d.barrier)

        # --- tokenizer and data (rank 0 tokenizes and caches; the others then read the cache)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        ensure_pad_token(self.tokenizer, cfg.model.pad_token, cfg.data.chat_template_kwargs)
        if self.is_main:
            self.data = prepare_data(cfg.data, self.tokenizer, cfg.train.seed)
        d.barrier()
        if not self.is_main:
            self.data = prepare_data(cfg.data, self.tokenizer, cfg.train.seed)
        self._log_data_report(self.data)
        self.data_metrics = _data_metrics(self.data.report)
        self.sampler = StepSampler(len(self.data.train), cfg.train.global_batch_pairs, cfg.train.seed,
                                   cfg.data.shuffle)
        spe = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * spe))

        # --- model and engine
        self.dtype = resolve_dtype(cfg.model.dtype, d.device)
        if d.device.type == "cpu" and self.dtype == torch.bfloat16:
            log.warning("bf16 on CPU is slow and DeepSpeed's CPU path is tested in fp32")
        self.ds_config = build_ds_config(cfg, d.world_size, self.dtype, d.device.type)
        self._hf_ds = None
        if cfg.deepspeed.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must be alive during from_pretrained: partitioned load
        attn = resolve_attn_implementation(cfg.model.attn_implementation, d.device)
        rm = load_reward_model(cfg.model.name_or_path, self.tokenizer, dtype=self.dtype, attn_implementation=attn,
                               trust_remote_code=cfg.model.trust_remote_code, head_init_std=cfg.model.head_init_std,
                               seed=cfg.train.seed)
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(rm)
        rm.config.use_cache = False
        self.rm = rm
        # the prompt of a pair once per row, where the attention backend can take the layout
        self.share = cfg.data.share_prompt and sharing_mode(rm) is not None
        if cfg.data.share_prompt and not self.share and self.is_main:
            log.warning("data.share_prompt: attention %s cannot take a shared prompt; pairs are packed whole", attn)
        self.n_params = non_embedding_params(rm)
        self.shape = model_shape(rm.config)
        wrapper = RewardWrapper(rm)
        optimizer = build_optimizer(cfg, wrapper, d.device)
        o = cfg.optim
        warmup = o.warmup_steps or round(o.warmup_ratio * self.total_steps)
        import deepspeed

        def sched(opt):  # built on DeepSpeed's wrapped optimizer, whose param groups ZeRO may rewrite
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, self.total_steps, warmup, o.scheduler, o.min_lr_ratio))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=sched, config=self.ds_config)
        self.peak = peak_flops(torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu")

        # --- resume, logging, signals
        self.step = 0
        resume = ckpt.resolve_resume(cfg.checkpoint.resume, self.out)
        if resume is not None:
            state = ckpt.load_checkpoint(self.engine, resume, d.rank)
            pos = state["data"]
            expect = {"num_pairs": len(self.data.train), "global_batch_pairs": cfg.train.global_batch_pairs,
                      "seed": cfg.train.seed}
            if {k: pos[k] for k in expect} != expect:
                raise ValueError(f"cannot resume exactly from {resume}: data position {pos} does not match the "
                                 f"current data/config {expect}")
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume, self.step)
        self.stop_requested = False
        self.logger = build_logger(cfg, d.rank, to_dict(cfg), write=self._write)

    # ------------------------------------------------------------------------------------------------------------------

    def train(self) -> Path | None:
        cfg = self.cfg
        self._install_signal_handlers()
        if self.is_main and cfg.logging.progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_saved = None
        while self.step < self.total_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            if self.pbar is not None:
                self.pbar.update(1)
                self.pbar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
            done = self.step >= self.total_steps
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not done:
                metrics.update(self.evaluate())
            if self.step % cfg.logging.every == 0 or done:
                self.logger.log({**metrics, **self.data_metrics}, self.step)
            stop = self._agree_to_stop()
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or stop:
                last_saved = self.save()
            if stop:
                self._write(f"stopped by signal at step {self.step}; checkpoint: {last_saved}")
                return last_saved
        final_eval = self.evaluate()
        if final_eval:
            self.logger.log(final_eval, self.step)
            self.logger.summary(final_eval)
        if cfg.checkpoint.save_final and (last_saved is None or not last_saved.name.endswith(f"-{self.step}")):
            last_saved = self.save()
        if self.pbar is not None:
            self.pbar.close()
        return last_saved

    def train_step(self, step: int) -> dict:
        """One optimizer step over `global_batch_pairs` pairs, packed into this rank's micro-batches."""
        cfg, d, engine = self.cfg, self.dist, self.engine
        t0 = time.perf_counter()
        pairs = self.sampler.step_pairs(step)
        micro, plan, sizes = rank_micro_batches(self.data.train, pairs, cfg.data.max_tokens, d.world_size, d.rank,
                                                self.share)
        # Each pair weighs 1/N of the step: sum of per-pair losses / global pair count. DeepSpeed averages the
        # gradients over ranks, so scale by world_size to turn its mean back into a sum.
        scale = d.world_size / len(pairs)
        sums: dict[str, float] = {}
        engine.train()
        for i, batch in enumerate(micro):
            engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            loss, batch_sums = self._loss(batch)
            engine.backward(loss * scale, scale_wrt_gas=False)
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        engine.step()
        # --- metrics (global)
        keys = ["pairs", "loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_reward_sq",
                "rejected_reward_sq"]
        total = dict(zip(keys, d.sum([sums.get(k, 0.0) for k in keys])))
        metrics = finalize_metrics(total)
        dt = time.perf_counter() - t0
        bins = [b for rank_bins in plan for b in rank_bins]
        tokens = int(self.data.train.sizes[pairs].sum())  # the sequences' own tokens, shared prompts or not
        # MFU counts the FLOPs of the sequences themselves, so a shared prompt raises it like a faster kernel would
        seg = [n for p in pairs for n in self.data.train.seq_lengths(p)] if self.peak else []
        metrics.update(
            lr=self.scheduler.get_last_lr()[0] if self.scheduler else cfg.optim.lr,
            grad_norm=_float(engine.get_global_grad_norm()),
            pairs_per_s=len(pairs) / dt, tokens_per_s=tokens / dt, step_time_s=dt,
            packing=packing_efficiency(bins, sizes, cfg.data.max_tokens),
            prompt_tokens_saved=1.0 - sum(sizes) / max(tokens, 1),  # share of the tokens not run, by sharing prompts
            micro_steps=len(micro), epoch=step / self.sampler.steps_per_epoch)
        if self.peak:
            metrics["mfu"] = train_flops(self.n_params, *self.shape, seg) / dt / (self.peak * d.world_size)
        return metrics

    def _loss(self, batch):
        """Summed BT loss and metric sums of one packed micro-batch (a placeholder when a rank has no pairs)."""
        cfg = self.cfg
        empty = batch.n_pairs == 0
        if empty:  # every rank must run the same forwards (ZeRO collectives): a 2-token stand-in, weight 0
            tok = self.tokenizer.pad_token_id
            batch = collate_pairs([[tok]], [[tok]])
        rewards = self.engine(batch)
        margins = batch.margins.to(rewards.device) if cfg.train.loss.margin else None
        loss, sums = bt_loss(rewards[0::2], rewards[1::2], margins, cfg.train.loss.center_coef)
        if empty:
            return loss * 0.0, {}
        return loss, sums

    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, accuracy (overall, per source and category), reward mean/std. Collective."""
        ev: TokenizedPairs | None = self.data.eval
        if ev is None or len(ev) == 0:
            return {}
        cfg, d = self.cfg, self.dist
        sizes = ev.packed_sizes(self.share).tolist()
        plan = assign_to_ranks(best_fit_decreasing(sizes, cfg.data.max_tokens), sizes, d.world_size)
        self.engine.eval()
        sums: dict[str, float] = {}
        groups: dict[str, list[float]] = {}
        for mb in plan[d.rank]:
            batch = ev.batch(mb, self.share)
            if batch.n_pairs == 0:
                self._loss(batch)
                continue
            rewards = self.engine(batch)
            c, r = rewards[0::2], rewards[1::2]
            _, s = bt_loss(c, r, batch.margins.to(c.device) if cfg.train.loss.margin else None,
                           cfg.train.loss.center_coef)
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for ok, src, cat in zip((c > r).tolist(), batch.sources, batch.categories):
                for key in (f"source/{src}",) + ((f"category/{cat}",) if cat is not None else ()):
                    g = groups.setdefault(key, [0.0, 0.0])
                    g[0] += ok
                    g[1] += 1
        self.engine.train()
        keys = ["pairs", "loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_reward_sq",
                "rejected_reward_sq"]
        total = finalize_metrics(dict(zip(keys, d.sum([sums.get(k, 0.0) for k in keys]))))
        merged: dict[str, list[float]] = {}
        for part in d.gather_objects(groups):
            for k, (a, n) in part.items():
                m = merged.setdefault(k, [0.0, 0.0])
                m[0] += a
                m[1] += n
        out = {f"eval/{k}": v for k, v in total.items()}
        # Length baseline on the same pairs: how often the longer response is the chosen one (ties count wrong).
        c_len = ev.chosen_lengths
        out["eval/longer_wins_accuracy"] = float((c_len > ev.sizes - c_len).mean())
        out.update({f"eval/accuracy/{k}": a / n for k, (a, n) in sorted(merged.items())})
        return out

    # ------------------------------------------------------------------------------------------------------------------

    def save(self) -> Path:
        cfg = self.cfg
        meta = {"btrm_version": btrm.__version__, "chat_template_kwargs": cfg.data.chat_template_kwargs,
                "max_length": cfg.data.max_length, "pad_token_id": self.tokenizer.pad_token_id, "step": self.step}
        state = {"step": self.step, "epoch": self.step / self.sampler.steps_per_epoch,
                 "data": {"num_pairs": len(self.data.train), "global_batch_pairs": cfg.train.global_batch_pairs,
                          "seed": cfg.train.seed, "next_step": self.step}}
        path = ckpt.save_checkpoint(self.engine, self.rm, self.tokenizer, self.step, self.out, rank=self.dist.rank,
                                    barrier=self.dist.barrier, config_yaml=dump_yaml(cfg), meta=meta, state=state,
                                    keep_last=cfg.checkpoint.keep_last)
        if self.is_main and self.pbar is None:
            log.info("saved %s", path)
        return path

    def close(self) -> None:
        self.logger.close()
        if self.pbar is not None:
            self.pbar.close()

    # ------------------------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.stop_requested:  # second signal: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self._write(f"received signal {signum}: finishing the current step, then saving")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _agree_to_stop(self) -> bool:
        """Any rank's stop request stops all ranks at the same step."""
        return self.dist.sum([float(self.stop_requested)])[0] > 0

    def _write(self, text: str) -> None:
        if not self.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(text)
        else:
            print(text, flush=True)

    def _log_data_report(self, data: PreparedData) -> None:
        if not self.is_main:
            return
        rep = data.report
        self._write(f"data: {rep['train_pairs']} training pairs, {rep['eval_pairs']} held-out pairs")
        for split in ("train", "eval"):
            r = rep[split]
            if r.get("skipped"):
                self._write(f"  {split} skipped invalid rows: {json.dumps(r['skipped'])}")
                for reason, example in r.get("examples", {}).items():
                    self._write(f"    e.g. {example}")
            if r.get("overlong_dropped"):
                self._write(f"  {split} over-long pairs dropped: {json.dumps(r['overlong_dropped'])}")
            if r.get("overlong_truncated"):
                self._write(f"  {split} over-long pairs prompt-truncated: {json.dumps(r['overlong_truncated'])}")


def _data_metrics(report: dict) -> dict[str, float]:
    """Constant per run, logged with every step: pairs used, invalid rows skipped by reason, over-long handling."""
    out = {"data/train_pairs": report["train_pairs"], "data/eval_pairs": report["eval_pairs"]}
    for split in ("train", "eval"):
        r = report[split]
        reasons: dict[str, int] = {}
        for per_reason in r.get("skipped", {}).values():
            for reason, n in per_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        out.update({f"data/{split}_skipped/{k}": v for k, v in reasons.items()})
        out[f"data/{split}_overlong_dropped"] = sum(r.get("overlong_dropped", {}).values())
        out[f"data/{split}_overlong_truncated"] = sum(r.get("overlong_truncated", {}).values())
    return out


def _float(x) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def run(cfg: Config, on_done: Callable[[Path | None], None] | None = None) -> Path | None:
    trainer = Trainer(cfg)
    try:
        path = trainer.train()
    finally:
        trainer.close()
    if trainer.is_main and on_done is not None:
        on_done(path)
    return path
