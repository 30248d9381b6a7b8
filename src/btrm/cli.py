"""`btrm` command line: one sub-command per module, each module owns its arguments."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int | None.
COMMANDS = {
    "score": ("btrm.inference.cli_score", "score conversations or preference pairs from a jsonl file"),
    "serve": ("btrm.inference.server", "serve a reward model over HTTP (SGLang /classify contract)"),
    "eval": ("btrm.eval.cli", "evaluate on reward-model benchmarks"),
    "data": ("btrm.data.cli", "prepare (tokenize into the training cache), inspect and curate preference data"),
    "plan": ("btrm.plan", "estimate per-GPU memory and wall-clock for a training recipe"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="btrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if argv and argv[0] in COMMANDS:  # import only the module that runs: each pulls heavy deps
        names = [argv[0]]
    else:
        names = list(COMMANDS)
    for name in COMMANDS:
        p = sub.add_parser(name, help=COMMANDS[name][1])
        if name in names and len(names) == 1:
            importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):  # dotted --section.key=value (btrm data prepare)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    rc = importlib.import_module(COMMANDS[args.command][0]).run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
