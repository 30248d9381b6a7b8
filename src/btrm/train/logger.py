"""Metric loggers behind one interface; the loop never asks which are on."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class Logger:
    """Null logger (non-zero ranks, or everything off)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(Logger):
    def __init__(self, write=print):
        self.write = write

    def log(self, metrics, step):
        keys = ("loss", "accuracy", "margin", "lr", "grad_norm", "pairs_per_s", "tokens_per_s", "packing", "mfu")
        parts = [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
        parts += [f"{k}={_fmt(v)}" for k, v in metrics.items() if k.startswith("eval/") and "/" not in k[5:]]
        self.write(f"step {step}: " + " ".join(parts))


class JsonlLogger(Logger):
    """metrics.jsonl in the output dir: machine-readable history of every logged step.

    A run that starts at `start_step` (a resume, or 0) first drops the rows of later steps, which the run it
    continues logged after its checkpoint and this run logs again: the file reads as one run, one row per step.
    The rewrite goes through a temporary file and a rename, so a kill leaves the old file or the new one."""

    def __init__(self, path: Path, start_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step(line) <= start_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
        self.f = path.open("a", encoding="utf-8")

    def log(self, metrics, step):
        self.f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


class WandbLogger(Logger):
    def __init__(self, project: str, run_name: str | None, tags: list[str], config: dict, out_dir: Path,
                 write=print):
        import wandb

        # No API key -> offline run under out_dir/wandb (sync later with `wandb sync`).
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() and \
            "api.wandb.ai" in (Path.home() / ".netrc").read_text()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, tags=tags or None, config=config, dir=str(out_dir),
                              mode=mode, settings=wandb.Settings(console="off", x_disable_stats=True,
                                                                 silent=True))
        self.mode, self.write = mode, write

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def close(self):
        run_dir = Path(self.run.dir).parent  # <out>/wandb/offline-run-<time>-<id>; run.dir is its files/
        self.run.finish()
        if self.mode == "offline":
            self.write(f"wandb run saved offline in {run_dir}; upload it with:  wandb sync {run_dir}")


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics, step):
        for lg in self.loggers:
            lg.log(metrics, step)

    def summary(self, values):
        for lg in self.loggers:
            lg.summary(values)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_logger(cfg, rank: int, config_dict: dict, write=print, start_step: int = 0) -> Logger:
    if rank != 0:
        return Logger()
    out = Path(cfg.train.output_dir)
    loggers: list[Logger] = [ConsoleLogger(write), JsonlLogger(out / "metrics.jsonl", start_step)]
    if cfg.logging.wandb:
        loggers.append(WandbLogger(cfg.logging.project, cfg.logging.run_name, cfg.logging.tags, config_dict, out,
                                   write))
    return MultiLogger(loggers)


def _step(line: str) -> float:
    """The step of a metrics.jsonl row; a torn last line (a kill mid-write) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
