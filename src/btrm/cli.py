"""`btrm` command line: one sub-command per module, each module owns its arguments.

A user error (a missing file, a bad row or field, a wrong flag or config key, an unreachable Hub) ends in one line
on stderr naming it, and exit code 2; `--debug` anywhere on the command line, or BTRM_DEBUG=1, shows the
traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from btrm.config import ConfigError
from btrm.data.sources import BadRow
from btrm.errors import UserError

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int | None.
COMMANDS = {
    "score": ("btrm.inference.cli_score", "score conversations or preference pairs from a jsonl file"),
    "serve": ("btrm.inference.server", "serve a reward model over HTTP (SGLang /classify contract)"),
    "eval": ("btrm.eval.cli", "evaluate on reward-model benchmarks"),
    "data": ("btrm.data.cli", "inspect and curate preference data (stats, clean, dedup, decontaminate, swap, filter)"),
    "plan": ("btrm.plan", "estimate per-GPU memory and wall-clock for a training recipe"),
}
# OSError: files and folders that are not there, a model path or Hub id that cannot be loaded, the Hub unreachable
USER_ERRORS = (UserError, ConfigError, BadRow, OSError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("BTRM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, so sub-sub-commands need not declare it
    parser = argparse.ArgumentParser(prog="btrm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (or BTRM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    if argv and argv[0] in COMMANDS:  # import only the module that runs: each pulls heavy deps
        names = [argv[0]]
    else:
        names = list(COMMANDS)
    for name in COMMANDS:
        p = sub.add_parser(name, help=COMMANDS[name][1])
        if name in names and len(names) == 1:
            importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        rc = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"btrm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
