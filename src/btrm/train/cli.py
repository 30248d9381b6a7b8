"""Command line of train.py: `--config x.yaml` then dotted overrides (CLI > YAML > defaults)."""

from __future__ import annotations

import argparse
import sys

from btrm.config import ConfigError, load_config
from btrm.errors import UserError


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a Bradley-Terry reward model. Overrides: --section.key=value",
        epilog="example: deepspeed train.py --config configs/quickstart.yaml --optim.lr=1e-3")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--resume", default=None, help="checkpoint path, 'auto' (default) or 'none'")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher
    args, rest = parser.parse_known_args(argv)
    if args.resume is not None:
        rest = rest + [f"--checkpoint.resume={args.resume}"]
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from btrm.train.trainer import run

    def done(path):
        if path is not None:
            print(f"\nreward model saved to {path}\n"
                  f"score conversations with:  btrm score --model {path} --input conversations.jsonl "
                  f"--output scores.jsonl\nor in Python:  btrm.RewardModel.from_pretrained('{path}')"
                  ".score([[{'role': 'user', ...}, {'role': 'assistant', ...}]])", flush=True)

    try:
        run(cfg, on_done=done)
    except UserError as e:  # e.g. QLoRA asked for on a machine without CUDA: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
