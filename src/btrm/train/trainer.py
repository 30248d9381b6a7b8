"""The training loop: packed steps of the configured objective under DeepSpeed, eval, logging, checkpoints, exact
resume."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

import btrm
from btrm import attention, calibration, lora, sequence_parallel
from btrm.config import Config, dump_yaml, to_dict
from btrm.data.dataset import PreparedData, StepSampler, TokenizedPairs, rank_micro_batches
from btrm.data.packing import assign_to_ranks, best_fit_decreasing, collate_pairs, packing_efficiency
from btrm.data.pipeline import prepare_for_training
from btrm.data.sources import DataReport
from btrm.distributed import setup_distributed
from btrm.errors import UserError
from btrm.flops import model_shape, non_embedding_params, peak_flops, train_flops
from btrm.loss import build_objective, group_metric_sums
from btrm.modeling import enable_activation_checkpointing, load_reward_model, packed_rewards, resolve_dtype
from btrm.train import checkpoint as ckpt
from btrm.train.ds_config import build_ds_config
from btrm.train.logger import build_logger
from btrm.train.optim import build_optimizer, lr_scheduler

log = logging.getLogger("btrm")


# ----------------------------------------------------------------------------------------------------------------------
# Components


class RewardWrapper(torch.nn.Module):
    """What DeepSpeed wraps: PackedBatch -> rewards per sequence (the row split over the SP group when `dist` has
    one, btrm.sequence_parallel)."""

    def __init__(self, rm, dist=None):
        super().__init__()
        self.rm = rm
        self.dist = dist

    def forward(self, batch):
        if self.dist is not None and self.dist.sp_size > 1:
            return sequence_parallel.rewards(self.rm, batch, self.dist)
        return packed_rewards(self.rm, batch)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.is_main = int(os.environ.get("RANK", 0)) == 0
        self.pbar = None
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING, format="%(message)s")
        # --- data first, before the process group exists: tokenizing for hours must not keep any rank waiting in a
        # collective (which would time out); a cache that `btrm data prepare` wrote is memory-mapped at once.
        # self.cfg stays as written (built-ins unresolved): checkpoints save that
        cfg, self.tokenizer, self.data = prepare_for_training(cfg)
        self.dist = setup_distributed(cfg.deepspeed.timeout_s, cfg.train.sequence_parallel_size)
        d = self.dist
        # a packed row: data.max_tokens per rank, so an SP group's row holds max_tokens x SP (btrm.sequence_parallel)
        self.row_tokens = cfg.data.max_tokens * d.sp_size
        self.is_main = d.rank == 0  # the launcher's RANK may only be set by init (MPI discovery)
        torch.manual_seed(cfg.train.seed)
        self.out = Path(cfg.train.output_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out)
        d.barrier()
        self.data_metrics = self._report_data(self.data)
        self.sampler = StepSampler(len(self.data.train), cfg.train.global_batch_pairs, cfg.train.seed,
                                   cfg.data.shuffle)
        spe = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * spe))

        # --- model and engine
        self.dtype = resolve_dtype(cfg.model.dtype, d.device)
        if d.device.type == "cpu" and self.dtype == torch.bfloat16:
            log.warning("bf16 on CPU is slow and DeepSpeed's CPU path is tested in fp32")
        self.ds_config = build_ds_config(cfg, d.dp_size, self.dtype, d.device.type)
        self._hf_ds = None
        if cfg.deepspeed.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must be alive during from_pretrained: partitioned load
        attn = attention.select(cfg.model.attn_implementation, d.device, self.dtype)
        if d.sp_size > 1:  # before loading: a wrong size fails in seconds
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                                      trust_remote_code=cfg.model.trust_remote_code)
            sequence_parallel.check_attention(attn, d.sp_size)
            sequence_parallel.check_model(model_config, d.sp_size)
        use_lora = lora.enabled(cfg.model.lora)
        if use_lora:
            lora.check_available(cfg.model.lora, d.device)
        rm = load_reward_model(cfg.model.name_or_path, self.tokenizer, dtype=self.dtype, attn_implementation=attn,
                               trust_remote_code=cfg.model.trust_remote_code, head_init_std=cfg.model.head_init_std,
                               seed=cfg.train.seed,
                               **(lora.load_kwargs(cfg.model.lora, self.dtype) if use_lora else {}))
        self.peft = lora.apply(rm, cfg.model.lora, cfg.model.name_or_path) if use_lora else None  # btrm.lora
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(rm)
        rm.config.use_cache = False
        self.rm = rm
        # DeepSpeed's Ulysses attention around ours, and its SP groups for deepspeed.initialize
        mpu = sequence_parallel.enable(rm, attn, d) if d.sp_size > 1 else None
        self.share = cfg.data.share_prompt  # the prompt of a pair once per row: every backend can take the layout
        self.n_params = non_embedding_params(rm)
        self.shape = model_shape(rm.config)
        wrapper = RewardWrapper(rm, d)
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapper, optimizer=build_optimizer(cfg, wrapper, d.device),
            lr_scheduler=lr_scheduler(cfg.optim, self.total_steps), config=self.ds_config, mpu=mpu)
        self.objective = build_objective(cfg.train.loss)
        # What DeepSpeed divides the summed gradients by: the data-parallel replicas (it sums over the SP ranks of
        # one, btrm.sequence_parallel), except that ZeRO-3's reduce-scatter divides by every rank, SP or not
        # (DeepSpeed 0.19.8; ds_config keeps reduce_scatter on so that this holds).
        self.grad_divisor = d.world_size if cfg.deepspeed.zero_stage == 3 else d.dp_size
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
                raise UserError(f"cannot resume exactly from {resume}: data position {pos} does not match the "
                                 f"current data/config {expect}")
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume, self.step)
        self.stop_requested = False
        self.logger = build_logger(cfg, d.rank, to_dict(cfg), write=self._write, start_step=self.step)

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
        if self.is_main and final_eval and last_saved is not None:  # card + calibration (btrm.calibration)
            calibration.record_final_eval(last_saved, final_eval)
        if self.pbar is not None:
            self.pbar.close()
        return last_saved

    def train_step(self, step: int) -> dict:
        """One optimizer step over `global_batch_pairs` items (pairs or groups), packed into this rank's
        micro-batches."""
        cfg, d, engine = self.cfg, self.dist, self.engine
        t0 = time.perf_counter()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        pairs = self.sampler.step_pairs(step)
        micro, plan, sizes = rank_micro_batches(self.data.train, pairs, self.row_tokens, d.dp_size, d.dp_rank,
                                                self.share)
        # Each comparison (a pair's one, a group's ordered pairs or Plackett-Luce terms) weighs 1/N of the step:
        # summed losses / the step's global unit count (= the pair count for pairs). The ranks of an SP group run
        # the same micro-steps, so the world's sum counts each unit sp_size times. DeepSpeed averages the
        # gradients (self.grad_divisor), so scale by what it divides by to turn its mean back into a sum.
        units = d.sum([float(sum(self.objective.units(b) for b in micro))])[0] / d.sp_size
        scale = self.grad_divisor / max(units, 1.0)
        sums: dict[str, float] = {}
        engine.train()
        for i, batch in enumerate(micro):
            engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            loss, batch_sums, _ = self._loss(batch)
            engine.backward(loss * scale, scale_wrt_gas=False)
            _add(sums, batch_sums)
        engine.step()
        # --- metrics (global)
        metrics = self._reduce(sums)
        dt = time.perf_counter() - t0
        bins = [b for rank_bins in plan for b in rank_bins]
        tokens = int(self.data.train.sizes[pairs].sum())  # the sequences' own tokens, shared prompts or not
        # MFU counts the FLOPs of the sequences themselves, so a shared prompt raises it like a faster kernel would
        seg = self.data.train.seq_lengths(pairs) if self.peak else []
        metrics.update(
            lr=self.scheduler.get_last_lr()[0] if self.scheduler else cfg.optim.lr,
            grad_norm=_float(engine.get_global_grad_norm()),
            pairs_per_s=len(pairs) / dt, tokens_per_s=tokens / dt, step_time_s=dt,
            packing=packing_efficiency(bins, sizes, self.row_tokens),
            prompt_tokens_saved=1.0 - sum(sizes) / max(tokens, 1),  # share of the tokens not run, by sharing prompts
            micro_steps=len(micro), epoch=step / self.sampler.steps_per_epoch)
        if self.peak:
            metrics["mfu"] = train_flops(self.n_params, *self.shape, seg) / dt / (self.peak * d.world_size)
        if d.device.type == "cuda":  # peak allocated during the step, GiB: what btrm plan's estimate is checked against
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        return metrics

    def _loss(self, batch):
        """(summed loss, metric sums, rewards) of one packed micro-batch, through the configured objective.

        A rank without items in this micro-step still runs a forward (ZeRO collectives need every rank): a
        2-token stand-in whose loss and metric sums count 0, with the same metric keys as every other rank."""
        if batch.n_items == 0:
            tok = self.tokenizer.pad_token_id
            stand_in = collate_pairs([[tok]], [[tok]])
            loss, sums = self.objective.loss(self.engine(stand_in), stand_in)
            return loss * 0.0, {k: v * 0.0 for k, v in sums.items()}, None
        rewards = self.engine(batch)
        loss, sums = self.objective.loss(rewards, batch)
        return loss, sums, rewards

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """This rank's metric sums -> summed over ranks -> the objective's logged metrics. The ranks of an SP group
        hold the same sums (the same rewards): count each group once."""
        keys = sorted(sums)  # the objective returns the same keys on every rank
        total = self.dist.sum([sums[k] for k in keys])
        return self.objective.finalize({k: v / self.dist.sp_size for k, v in zip(keys, total)})

    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, accuracy (overall, per source and category), reward mean/std. Collective."""
        ev: TokenizedPairs | None = self.data.eval
        if ev is None or len(ev) == 0:
            return {}
        d = self.dist
        sizes = ev.packed_sizes(self.share).tolist()
        plan = assign_to_ranks(best_fit_decreasing(sizes, self.row_tokens), sizes, d.dp_size)
        self.engine.eval()
        sums: dict[str, float] = {}
        ranking: dict[str, float] = {}  # per-item ranking metrics, of the model and of the length-only baseline
        groups: dict[str, list[float]] = {}
        for mb in plan[d.dp_rank]:
            batch = ev.batch(mb, self.share)
            _, s, rewards = self._loss(batch)
            _add(sums, s)
            if rewards is None:
                continue
            _add(ranking, group_metric_sums(rewards, batch))
            lengths = torch.tensor(ev.seq_lengths(mb), dtype=torch.float)
            _add(ranking, {f"length_{k}": v for k, v in group_metric_sums(lengths, batch).items()
                           if k in ("top1", "kendall_tau")})
            for ok, src, cat in zip(batch.best_wins(rewards).tolist(), batch.sources, batch.categories):
                for key in (f"source/{src}",) + ((f"category/{cat}",) if cat is not None else ()):
                    g = groups.setdefault(key, [0.0, 0.0])
                    g[0] += ok
                    g[1] += 1
        self.engine.train()
        total = self._reduce(sums)
        merged: dict[str, list[float]] = {}
        for part in d.gather_objects(groups)[::d.sp_size]:  # SP rank 0 of each group (consecutive ranks)
            for k, (a, n) in part.items():
                m = merged.setdefault(k, [0.0, 0.0])
                m[0] += a
                m[1] += n
        out = {f"eval/{k}": v for k, v in total.items()}
        keys = ["groups", "top1", "kendall_tau", "length_top1", "length_kendall_tau", "responses", "reward",
                "reward_sq"]
        rk = {k: v / d.sp_size for k, v in zip(keys, d.sum([ranking.get(k, 0.0) for k in keys]))}  # SP: as _reduce
        n, m = max(rk["groups"], 1.0), max(rk["responses"], 1.0)
        out.update({"eval/top1_accuracy": rk["top1"] / n, "eval/kendall_tau": rk["kendall_tau"] / n,
                    "eval/groups": rk["groups"], "eval/responses": rk["responses"],
                    "eval/reward_mean": rk["reward"] / m,
                    "eval/reward_std": max(rk["reward_sq"] / m - (rk["reward"] / m) ** 2, 0.0) ** 0.5})
        # Length baseline on the same items: the longer response is the better one (a tie counts wrong). For pairs
        # its top-1 is how often the longer response is the chosen one.
        out["eval/longer_wins_accuracy"] = rk["length_top1"] / n
        out["eval/longer_wins_kendall_tau"] = rk["length_kendall_tau"] / n
        out.update({f"eval/accuracy/{k}": a / n for k, (a, n) in sorted(merged.items())})
        return out

    # ------------------------------------------------------------------------------------------------------------------

    def save(self) -> Path:
        cfg = self.cfg
        meta = {"btrm_version": btrm.__version__, "chat_template_kwargs": cfg.data.chat_template_kwargs,
                "max_length": cfg.data.max_length, "pad_token_id": self.tokenizer.pad_token_id, "step": self.step,
                "base_model": cfg.model.name_or_path, "data": self.data.report}  # the last two for the card
        if self.peft is not None:
            meta["lora"] = lora.meta(cfg.model.lora, self.peft)
        state = {"step": self.step, "epoch": self.step / self.sampler.steps_per_epoch,
                 "data": {"num_pairs": len(self.data.train), "global_batch_pairs": cfg.train.global_batch_pairs,
                          "seed": cfg.train.seed, "next_step": self.step}}
        path = ckpt.save_checkpoint(self.engine, self.rm, self.tokenizer, self.step, self.out, rank=self.dist.rank,
                                    barrier=self.dist.barrier, config_yaml=dump_yaml(cfg), meta=meta, state=state,
                                    keep_last=cfg.checkpoint.keep_last, lora_model=self.peft)
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

    def _report_data(self, data: PreparedData) -> dict[str, float]:
        """Print what happened to the raw rows (rank 0); return the counts logged with every step."""
        rep = data.report
        self._write(f"data: {rep['train_pairs']} training pairs, {rep['eval_pairs']} held-out pairs")
        metrics = {"data/train_pairs": rep["train_pairs"], "data/eval_pairs": rep["eval_pairs"]}
        for split in ("train", "eval"):
            report = DataReport.from_dict(rep[split])
            for line in report.log_lines(split):
                self._write(line)
            metrics.update(report.metrics(split))
        return metrics


def _add(sums: dict[str, float], more: dict) -> None:
    for k, v in more.items():
        sums[k] = sums.get(k, 0.0) + float(v)


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
    trainer.dist.shutdown()  # only after a finished run: a rank that failed must not wait in a barrier
    if trainer.is_main and on_done is not None:
        on_done(path)
    return path
