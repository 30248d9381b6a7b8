"""Reward calibration: mean and std of a model's rewards on held-out data, stored with the checkpoint.

A Bradley-Terry model's rewards have an arbitrary offset and scale (only differences are trained), so a model may
score around 60 or around -3. The stats let a user put rewards on a common scale, (r - mean) / std, before RL:
`RewardModel.score(..., normalize=True)`, `btrm score --normalize`, `btrm serve --normalize`. Raw rewards stay the
default everywhere, so a released model scores as its card says.

Stored in two places (see `store`):
  btrm_meta.json  {"calibration": {"mean", "std", "n", "source"}}
  config.json     "reward_mean", "reward_std" (extra keys transformers keeps; HF, SGLang and vLLM never apply them)
`std` is the population std (ddof 0) over every reward of the sample: chosen and rejected sides alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from btrm.errors import UserError

META_FILE = "btrm_meta.json"
CONFIG_KEYS = {"mean": "reward_mean", "std": "reward_std"}


def stats(rewards: Sequence[float], source: str) -> dict:
    """{"mean", "std", "n", "source"} of a sample of rewards."""
    n = len(rewards)
    if n < 2:
        raise UserError(f"calibration needs at least 2 rewards, got {n} ({source})")
    mean = math.fsum(rewards) / n
    var = math.fsum((r - mean) ** 2 for r in rewards) / n
    return {"mean": mean, "std": math.sqrt(var), "n": n, "source": source}


def from_eval_metrics(metrics: dict, source: str) -> dict | None:
    """Stats of all held-out rewards (both sides) from the trainer's eval metrics: every held-out response once
    (`eval/responses`, which groups need), else per-side means and stds over the same pairs; None when there was
    no held-out data."""
    if metrics.get("eval/responses"):
        return {"mean": metrics["eval/reward_mean"], "std": metrics["eval/reward_std"],
                "n": int(metrics["eval/responses"]), "source": source}
    n = metrics.get("eval/pairs", 0)
    if not n:
        return None
    mc, mr = metrics["eval/chosen_reward"], metrics["eval/rejected_reward"]
    sc, sr = metrics["eval/chosen_reward_std"], metrics["eval/rejected_reward_std"]
    mean = (mc + mr) / 2
    second = (sc * sc + mc * mc + sr * sr + mr * mr) / 2  # E[r^2] over both sides
    return {"mean": mean, "std": math.sqrt(max(second - mean * mean, 0.0)), "n": int(2 * n), "source": source}


def store(checkpoint: str | Path, cal: dict) -> None:
    """Write the stats into btrm_meta.json and config.json of a checkpoint dir, then refresh its README.md."""
    from btrm.card import write_card

    ckpt = Path(checkpoint)
    meta_file = ckpt / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["calibration"] = cal
    meta_file.write_text(json.dumps(meta, indent=1))
    cfg_file = ckpt / "config.json"
    config = json.loads(cfg_file.read_text())
    config.update({key: cal[k] for k, key in CONFIG_KEYS.items()})
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_card(ckpt)


def load(meta: dict, config=None) -> dict | None:
    """The stored stats: btrm_meta.json first, else config.json's reward_mean / reward_std (e.g. a merged export
    copied without its meta file)."""
    if meta.get("calibration"):
        return meta["calibration"]
    if config is not None and getattr(config, "reward_std", None):
        return {"mean": config.reward_mean, "std": config.reward_std, "source": "config.json"}
    return None


def normalize(rewards: list[float], cal: dict | None, where: str = "this model") -> list[float]:
    if not cal:
        raise UserError(f"{where} has no reward calibration: run `btrm score --model CKPT --calibrate` first "
                        "(or score raw rewards without --normalize)")
    mean, std = cal["mean"], cal["std"]
    if not std > 0:
        raise UserError(f"{where}: stored reward std is {std}; cannot normalize")
    return [(r - mean) / std for r in rewards]


def heldout_pairs(checkpoint: str | Path):
    """The held-out pairs of the run that wrote `checkpoint` (its btrm_config.yaml): `data.eval_sources`, or the
    `eval_fraction` hash split of the training sources, exactly as the trainer split them."""
    from btrm.builtin import resolve_builtins
    from btrm.config import load_config
    from btrm.data.dataset import is_heldout, pair_hash
    from btrm.data.sources import DataReport, load_pairs

    cfg_file = Path(checkpoint) / "btrm_config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{checkpoint}: no btrm_config.yaml, so no held-out data is known; pass --input FILE")
    cfg = resolve_builtins(load_config(cfg_file, validate=False), True, lambda: None)
    d, report = cfg.data, DataReport()
    if d.eval_sources:
        return load_pairs(d.eval_sources, report, d.strict, cfg.train.seed)
    if d.eval_fraction > 0:
        pairs = load_pairs(d.sources, report, d.strict, cfg.train.seed)
        return [p for p in pairs if is_heldout(pair_hash(p.chosen, p.rejected), d.eval_fraction)]
    raise UserError(f"{cfg_file}: the run held out no data (data.eval_sources empty, data.eval_fraction 0); "
                    "pass --input FILE")


def record_final_eval(checkpoint: str | Path, metrics: dict) -> dict | None:
    """After training: the final held-out metrics go into btrm_meta.json (for the card) and their reward stats
    become the checkpoint's calibration. Returns the stats (None without held-out data)."""
    ckpt = Path(checkpoint)
    meta_file = ckpt / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["heldout"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    meta_file.write_text(json.dumps(meta, indent=1))
    cal = from_eval_metrics(metrics, "held-out pairs, end of training")
    if cal is not None:
        store(ckpt, cal)
    return cal
