"""A user error in any `btrm` subcommand ends in one line naming what is wrong, exit code 2; `--debug` (or
BTRM_DEBUG=1) shows the traceback instead."""

import os
import signal
import subprocess
import sys

import pytest

from btrm.cli import main
from btrm.config import ConfigError

MISSING = "/nonexistent/w11"
CASES = {  # subcommand -> (argv, what the line must name, the exception --debug lets through)
    "eval": (["eval", "--recompute", f"{MISSING}/judgebench.rows.jsonl"], f"{MISSING}/judgebench.rows.jsonl",
             FileNotFoundError),
    "score": (["score", "--model", f"{MISSING}/ckpt", "--input", "in.jsonl", "--output", "out.jsonl"],
              f"{MISSING}/ckpt: no such checkpoint directory", FileNotFoundError),
    "serve": (["serve", "--model", f"{MISSING}/ckpt", "--port", "0"], f"{MISSING}/ckpt: no such checkpoint directory",
              FileNotFoundError),
    "data": (["data", "clean", "--source", f"{MISSING}/pairs.jsonl", "--output", "out.jsonl"],
             f"{MISSING}/pairs.jsonl", None),  # btrm data reports its own errors in one line (no --debug)
    "plan": (["plan", "--config", f"{MISSING}/recipe.yaml", "--gpus", "1", "--gpu-memory", "80"],
             f"config file not found: {MISSING}/recipe.yaml", ConfigError),
}


@pytest.fixture
def signal_handlers():
    """`btrm serve` installs its own SIGINT / SIGTERM handlers: put the test process's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("command", list(CASES))
def test_user_error_is_one_line_and_exit_2(command, capsys, monkeypatch, tmp_path, signal_handlers):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BTRM_DEBUG", raising=False)
    argv, names, debug_exc = CASES[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"btrm {command}") and names in last
    if debug_exc is not None:
        with pytest.raises(debug_exc):
            main(argv + ["--debug"])
        monkeypatch.setenv("BTRM_DEBUG", "1")
        with pytest.raises(debug_exc):
            main(argv)


def test_a_real_process_exits_2_without_traceback_unless_btrm_debug(tmp_path):
    # --recompute loads no model: a cheap real `btrm` process
    cmd = [sys.executable, "-m", "btrm.cli", "eval", "--recompute", str(tmp_path / "nope.rows.jsonl")]
    env = {k: v for k, v in os.environ.items() if k != "BTRM_DEBUG"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "nope.rows.jsonl" in plain.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BTRM_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
