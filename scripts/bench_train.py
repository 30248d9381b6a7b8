"""Training throughput side by side on CPU: btrm packed vs btrm padded vs TRL's RewardTrainer.

    pip install -e '.[bench]'          # trl, psutil
    python scripts/bench_train.py [--steps 6 --pairs-per-step 32 --hidden 256 --layers 4] [--rounds 1] [--out x.json]

Same tiny random-init Llama, same pairs (long-tailed, lognormal lengths) in the same order, same init, same AdamW
(btrm's `build_optimizer`: lr, betas, eps, weight decay and its no-decay groups), constant lr, grad clip 1.0, fp32,
no gradient checkpointing. Step s of every run trains on pairs [s*B, (s+1)*B) of the file:

  packed  the real trainer (`btrm.train.cli.main`, i.e. `python train.py --config ...`): best-fit-decreasing
          packed micro-batches of <= max_tokens, `btrm_segment` attention, DeepSpeed ZeRO-1 engine.
  padded  btrm with packing off (built here; the trainer has no such mode): micro-batches of 8 pairs padded to the
          longest of their 16 sequences, HF forward with attention_mask (sdpa), reward at the last non-pad token,
          btrm's `bt_loss`, same pair weighting (sum of per-pair losses / pairs per step), torch AdamW.
  trl     trl.RewardTrainer: per_device_train_batch_size 8 x gradient_accumulation_steps B/8, sequential sampler,
          pre-tokenized `chosen_ids`/`rejected_ids` (the exact btrm token ids), our optimizer passed in.

Each run is its own process (so peak RSS is per run). The first step is a warm-up and is not timed. Real tokens
exclude padding; the padding share is pad / (real + pad) over the tensors the model actually ran on. On a shared
machine, look at "cores busy" (CPU seconds / wall seconds of the timed steps, ~ the thread count when the run had
the cores to itself) and the load average; `--rounds N` alternates the runs N times and keeps each one's fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("packed", "padded", "trl")
MICRO_PAIRS = 8  # pairs per padded / TRL micro-batch (TRL's per_device_train_batch_size)
LOSS_TOL = 1e-4  # packed vs padded per-step loss, fp32: only summation order differs

# Words for synthetic text; chosen answers end politely, rejected ones rudely, so the loss has something to learn.
_WORDS = ("the a of to and in is it that for on with as was at by this from or be are an have not but what all "
          "were when we there can your which their said if do will each about how up out them then she many some "
          "so these would other into has more her two like him see time could no make than first been its who now "
          "people my made over did down only way find use may water long little very after words called just where "
          "most know river coffee garden music train winter bread owl volcano library desert mountain tea").split()
_GOOD = ("Thank you for asking, I hope this helps.", "Happy to help, let me know if anything is unclear.")
_BAD = ("Whatever, figure it out yourself.", "Stop bothering me with this.")


# ----------------------------------------------------------------------------------------------------------------------
# Setup: model, data, trainer config (shared by the three runs)


def write_pairs(path: Path, n: int, seed: int) -> None:
    """Long-tailed lengths: prompt and each response ~ lognormal in words (median 40 / 56 words, sigma 1.0 / 0.9)."""
    import numpy as np

    from btrm.tiny import lognormal_text

    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = lognormal_text(rng, _WORDS, 40, 1.0, 700)
            good = lognormal_text(rng, _WORDS, 56, 0.9, 700) + " " + _GOOD[i % 2]
            bad = lognormal_text(rng, _WORDS, 56, 0.9, 700) + " " + _BAD[i % 2]
            user = {"role": "user", "content": prompt}
            f.write(json.dumps({"chosen": [user, {"role": "assistant", "content": good}],
                                "rejected": [user, {"role": "assistant", "content": bad}]}) + "\n")


def setup(work: Path, args) -> Path:
    import yaml

    from btrm.tiny import build_tiny_model

    model_dir = build_tiny_model("llama3", work / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=8, num_kv_heads=4, intermediate_size=4 * args.hidden, seed=args.seed)
    data = work / "pairs.jsonl"
    write_pairs(data, args.steps * args.pairs_per_step, args.seed)
    cfg = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32", "attn_implementation": "segment",
                  "gradient_checkpointing": False},
        "data": {"sources": [{"path": str(data)}], "max_length": args.max_tokens // 2, "max_tokens": args.max_tokens,
                 "shuffle": False, "eval_fraction": 0.0, "cache_dir": str(work / "cache")},
        "optim": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01, "scheduler": "constant",
                  "warmup_steps": 0, "grad_clip": 1.0},
        "train": {"output_dir": str(work / "packed"), "global_batch_pairs": args.pairs_per_step,
                  "max_steps": args.steps, "seed": args.seed},
        "checkpoint": {"resume": "none", "save_final": False},
        "logging": {"wandb": False, "progress": False},
        "deepspeed": {"zero_stage": 1},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Workers (one process each)


def _prepared(config_path: Path):
    """Config, tokenizer, reward model (same init as the trainer's) and the trainer's tokenized pairs, in order."""
    import torch
    from transformers import AutoTokenizer

    from btrm.config import load_config
    from btrm.data.dataset import prepare_data
    from btrm.modeling import ensure_pad_token, load_reward_model

    cfg = load_config(config_path)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    ensure_pad_token(tok, cfg.model.pad_token, cfg.data.chat_template_kwargs)
    torch.manual_seed(cfg.train.seed)
    model = load_reward_model(cfg.model.name_or_path, tok, dtype=torch.float32, attn_implementation="sdpa",
                              head_init_std=cfg.model.head_init_std, seed=cfg.train.seed)
    model.config.use_cache = False
    data = prepare_data(cfg.data, tok, cfg.train.seed, use_cache=False).train
    return cfg, tok, model, data


def _constant_schedule(opt):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def run_packed(config_path: Path) -> dict:
    """The real trainer, in this process (= `python train.py --config ...`); per-step figures from metrics.jsonl."""
    from btrm.config import load_config
    from btrm.train import trainer
    from btrm.train.cli import main as train_main

    cpu: list[float] = []  # CPU seconds of each train_step (instrumentation only)
    train_step = trainer.Trainer.train_step

    def timed_step(self, step):
        c0 = time.process_time()
        metrics = train_step(self, step)
        cpu.append(time.process_time() - c0)
        return metrics

    trainer.Trainer.train_step = timed_step
    out = Path(load_config(config_path).train.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: one run per round
    if train_main(["--config", str(config_path)]) != 0:
        raise SystemExit("trainer failed")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [{"loss": s["loss"], "time_s": s["step_time_s"], "cpu_s": c, "pairs": s["pairs"],
                       "real_tokens": round(s["tokens_per_s"] * s["step_time_s"]),
                       "pad_tokens": 0, "bin_fill": s["packing"], "micro_steps": s["micro_steps"]}
                      for s, c in zip([s for s in steps if "loss" in s], cpu)]}


def run_padded(config_path: Path) -> dict:
    """btrm with packing off: same loss, weighting, optimizer and clip as the trainer; pad-to-longest batches."""
    import numpy as np
    import torch

    from btrm.data.packing import pad_pairs
    from btrm.loss import bt_loss
    from btrm.train.optim import build_optimizer

    cfg, tok, model, data = _prepared(config_path)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    sched = _constant_schedule(opt)
    n = cfg.train.global_batch_pairs
    model.train()
    steps = []
    for step in range(cfg.train.max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        pairs = list(range(step * n, (step + 1) * n))
        loss_sum, real, total = 0.0, 0, 0
        for k in range(0, n, MICRO_PAIRS):
            rows = data.ds[pairs[k:k + MICRO_PAIRS]]
            ids, mask = pad_pairs(rows["chosen_ids"], rows["rejected_ids"], tok.pad_token_id)
            rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
            m = len(rows["chosen_ids"])
            loss, sums = bt_loss(rewards[:m], rewards[m:])
            (loss / n).backward()  # sum of per-pair losses / pairs per step, as the trainer weighs them
            loss_sum += float(sums["loss"])
            real, total = real + int(mask.sum()), total + mask.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"loss": loss_sum / n, "time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "pairs": n, "real_tokens": real, "pad_tokens": total - real})
    lengths = np.asarray([len(x) for col in ("chosen_ids", "rejected_ids")
                          for x in data.ds.select(range(cfg.train.max_steps * n))[col]])
    quantiles = {"mean": lengths.mean(), **{f"p{q}": np.percentile(lengths, q) for q in (10, 50, 90, 99)},
                 "max": lengths.max()}
    return {"steps": steps, "seq_len_quantiles": {k: float(v) for k, v in quantiles.items()}}


def run_trl(config_path: Path, work: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from btrm.render import render_ids
    from btrm.train.optim import build_optimizer

    cfg, tok, model, data = _prepared(config_path)
    n = cfg.train.global_batch_pairs
    if n % MICRO_PAIRS:
        raise SystemExit(f"--pairs-per-step must be a multiple of {MICRO_PAIRS}")
    rows = data.ds.select(range(cfg.train.max_steps * n))
    # TRL would tokenize conversations itself (apply_chat_template(tokenize=True)); check it gets the same ids.
    raw = [json.loads(line) for line in Path(cfg.data.sources[0].path).read_text().splitlines()[:50]]
    same = sum(tok.apply_chat_template(r[side], tokenize=True, return_dict=True)["input_ids"]
               == render_ids(tok, r[side]) for r in raw for side in ("chosen", "rejected"))
    train_ds = Dataset.from_dict({"chosen_ids": rows["chosen_ids"], "rejected_ids": rows["rejected_ids"]})

    micro: list[tuple[float, int, int, int]] = []  # (mean loss, pairs, real tokens, all tokens) per micro-batch
    ends: list[tuple[float, float]] = []  # (wall, CPU) clock at train begin and at each step end

    class Bench(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            mask = inputs["attention_mask"]
            micro.append((float(loss), mask.shape[0] // 2, int(mask.sum()), mask.numel()))
            return out

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

    args = RewardConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=MICRO_PAIRS,
        gradient_accumulation_steps=n // MICRO_PAIRS, max_steps=cfg.train.max_steps, learning_rate=cfg.optim.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=cfg.optim.grad_clip, bf16=False, fp16=False,
        gradient_checkpointing=False, max_length=None, train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=cfg.train.seed,
        dataloader_num_workers=0)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    trainer = Bench(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                    optimizers=(opt, _constant_schedule(opt)), callbacks=[StepClock()])
    trainer.train()
    gas = n // MICRO_PAIRS
    steps = []
    for s in range(cfg.train.max_steps):
        mb = micro[s * gas:(s + 1) * gas]
        steps.append({"loss": sum(l * p for l, p, _, _ in mb) / sum(p for _, p, _, _ in mb),
                      "time_s": ends[s + 1][0] - ends[s][0], "cpu_s": ends[s + 1][1] - ends[s][1],
                      "pairs": sum(p for _, p, _, _ in mb),
                      "real_tokens": sum(r for _, _, r, _ in mb), "pad_tokens": sum(t - r for _, _, r, t in mb)})
    return {"steps": steps, "trl_version": trl.__version__,
            "trl_chat_template_ids_match": f"{same}/{2 * len(raw)}"}


def worker(run: str, work: Path) -> None:
    load0 = os.getloadavg()[0]
    config_path = work / "config.yaml"
    if run == "packed":
        res = run_packed(config_path)
    elif run == "padded":
        res = run_padded(config_path)
    else:
        res = run_trl(config_path, work)
    res.update(run=run, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               load_avg_1m=[load0, os.getloadavg()[0]])
    (work / f"{run}.json").write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------------------------------
# Summary


def summarize(res: dict) -> dict:
    timed = res["steps"][1:]  # step 1 is the warm-up
    t = sum(s["time_s"] for s in timed)
    cpu = sum(s["cpu_s"] for s in timed)
    real = sum(s["real_tokens"] for s in timed)
    pad = sum(s["pad_tokens"] for s in timed)
    # cores busy = CPU s / wall s: ~ the thread count when the run had the machine, lower when it shared it
    return {"tokens_per_s": real / t, "tokens_per_cpu_s": real / cpu, "cores_busy": cpu / t,
            "pairs_per_s": sum(s["pairs"] for s in timed) / t,
            "padding_share": pad / (real + pad), "peak_rss_mb": res["peak_rss_mb"], "timed_s": t,
            "final_loss": res["steps"][-1]["loss"], "losses": [s["loss"] for s in res["steps"]],
            "load_avg_1m": res["load_avg_1m"]}


def report(results: dict, args, load_at_start: float) -> dict:
    import torch
    import transformers

    s = {run: summarize(results[run]) for run in results}
    print()
    print(f"{args.steps} steps x {args.pairs_per_step} pairs (step 1 = warm-up, not timed); Llama {args.layers} layers "
          f"x {args.hidden} hidden; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; best of {args.rounds} round(s); 1-min load average before starting: "
          f"{load_at_start:.2f}")
    if "padded" in results:
        q = results["padded"]["seq_len_quantiles"]
        print("sequence lengths (tokens): " + ", ".join(f"{k} {v:,.0f}" for k, v in q.items()))
    if "packed" in s and "padded" in s:
        s["packed_vs_padded_max_loss_diff"] = max(abs(a - b) for a, b in zip(s["packed"]["losses"],
                                                                              s["padded"]["losses"]))
    if "trl" in s and "padded" in s:
        s["trl_vs_padded_max_loss_diff"] = max(abs(a - b) for a, b in zip(s["trl"]["losses"], s["padded"]["losses"]))
    ratio = {f"packed/{base}": s["packed"]["tokens_per_s"] / s[base]["tokens_per_s"]
             for base in ("trl", "padded") if "packed" in s and base in s}
    cpu_ratio = {f"packed/{base}": s["packed"]["tokens_per_cpu_s"] / s[base]["tokens_per_cpu_s"]
                 for base in ("trl", "padded") if "packed" in s and base in s}
    s["ratios"], s["ratios_per_cpu_s"] = ratio, cpu_ratio
    print("per-step loss:")
    for run in RUNS:
        if run in s:
            print(f"  {run:7s} " + " ".join(f"{x:.6f}" for x in s[run]["losses"]))
    for k in ("packed_vs_padded_max_loss_diff", "trl_vs_padded_max_loss_diff"):
        if k in s:
            print(f"{k}: {s[k]:.2e}")
    names = {"packed": "btrm packed (trainer)", "padded": f"btrm padded ({MICRO_PAIRS} pairs, pad-to-longest)",
             "trl": f"TRL RewardTrainer ({MICRO_PAIRS} pairs x grad. accum.)"}
    print()
    print(f"| run | real tokens/s | pairs/s | padding share | peak RSS (MB) | loss after {args.steps} steps | "
          "real tokens per CPU-s | cores busy | load avg 1m at end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in RUNS:
        if run in s:
            x = s[run]
            print(f"| {names[run]} | {x['tokens_per_s']:,.0f} | {x['pairs_per_s']:.2f} | {x['padding_share']:.1%} | "
                  f"{x['peak_rss_mb']:,.0f} | {x['final_loss']:.6f} | {x['tokens_per_cpu_s']:,.0f} | "
                  f"{x['cores_busy']:.2f} | {x['load_avg_1m'][1]:.2f} |")
    print()
    print("Ratios of real tokens/s: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratio.items())
          + " (per CPU-second: " + ", ".join(f"{k} = {v:.2f}x" for k, v in cpu_ratio.items()) + ").")
    if "trl" in results:
        r = results["trl"]
        print(f"TRL {r['trl_version']} was fed btrm's token ids as pre-tokenized `chosen_ids`/`rejected_ids`; "
              f"TRL's own chat-template tokenization gives identical ids for {r['trl_chat_template_ids_match']} "
              "sequences checked.")
    targets = {}
    if "packed/trl" in ratio:
        targets["btrm packed >= 2x TRL real tokens/s"] = ratio["packed/trl"] >= 2.0
    if "packed/padded" in ratio:
        targets["btrm packed >= 1.5x btrm padded real tokens/s"] = ratio["packed/padded"] >= 1.5
        targets[f"same loss as btrm padded (every step within {LOSS_TOL:g})"] = (
            s["packed_vs_padded_max_loss_diff"] <= LOSS_TOL)
    for name, ok in targets.items():
        print(f"target: {name}: {'met' if ok else 'MISSED'}")
    s["targets"] = targets
    s["meta"] = {"steps": args.steps, "pairs_per_step": args.pairs_per_step, "hidden": args.hidden,
                 "layers": args.layers, "max_tokens": args.max_tokens, "lr": args.lr, "rounds": args.rounds,
                 "load_avg_1m_at_start": load_at_start, "torch": torch.__version__,
                 "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                 "cpus": os.cpu_count(), "trl": results.get("trl", {}).get("trl_version")}
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--pairs-per-step", type=int, default=32, help=f"global batch in pairs (multiple of {MICRO_PAIRS})")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8192, help="packed micro-batch budget (tokens)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the runs, alternating, and keep each run's fastest round (noisy shared machines)")
    ap.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    ap.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.work))
        return
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup(work, args)
        results: dict[str, dict] = {}
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        for rnd in range(args.rounds):
            for run in args.runs.split(","):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--worker", run, "--work", str(work)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{run} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
                res = json.loads((work / f"{run}.json").read_text())
                tps = summarize(res)["tokens_per_s"]
                print(f"round {rnd + 1} {run}: {tps:,.0f} real tokens/s, process {time.perf_counter() - t0:.0f}s, "
                      f"1-min load at end {res['load_avg_1m'][1]:.2f}", flush=True)
                if run not in results or tps > summarize(results[run])["tokens_per_s"]:
                    results[run] = res
        summary = report(results, args, load_at_start)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
