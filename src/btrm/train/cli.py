"""Command line of train.py: `--config x.yaml` then dotted overrides (CLI > YAML > defaults)."""

from __future__ import annotations

import argparse
import os
import sys

from btrm.config import ConfigError, load_config


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a Bradley-Terry reward model. Overrides: --section.key=value",
        epilog="example: deepspeed train.py --config configs/quickstart.yaml --optim.lr=1e-3")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of data errors (or BTRM_DEBUG=1)")
    parser.add_argument("--resume", default=None, help="checkpoint path, 'auto' (default) or 'none'")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher
    args, rest = parser.parse_known_args(argv)
    if args.resume is not None:
        rest = rest + [f"--checkpoint.resume={args.resume}"]
    return args, rest


def main(argv: list[str] | None = None) -> int:
    """Config errors, and data errors (a strict-mode bad row, a missing or empty file, wrong columns), end in one
    line on stderr from rank 0 and exit code 2; the other ranks exit quietly (a rank waiting for rank 0's data
    cache is stopped by the launcher when rank 0 exits). `--debug` or BTRM_DEBUG=1 shows
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("BTRM_DEBUG", "") not in ("", "0")
    args, overrides = parse_args([a for a in argv if a != "--debug"])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from btrm.cli import USER_ERRORS, one_line
    from btrm.train.trainer import run

    def done(path):
        if path is not None:
            print(f"\nreward model saved to {path}\n"
                  f"score conversations with:  btrm score --model {path} --input conversations.jsonl "
                  f"--output scores.jsonl\nor in Python:  btrm.RewardModel.from_pretrained('{path}')"
                  ".score([[{'role': 'user', ...}, {'role': 'assistant', ...}]])", flush=True)

    try:
        run(cfg, on_done=done)
    except USER_ERRORS as e:  # a data, config or setup mistake (e.g. QLoRA without CUDA): one line, no traceback
        if os.environ.get("RANK", "0") != "0":  # every rank may meet the same mistake: rank 0 reports it
            return 2
        if debug:
            raise
        print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
