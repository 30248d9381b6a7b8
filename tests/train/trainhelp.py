"""Helpers for launching the real trainer from tests."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, model_dir, data_file, **sections) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "data": {"sources": [{"path": str(data_file)}], "max_length": 256, "max_tokens": 512,
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"output_dir": str(tmp_path / "out"), "global_batch_pairs": 16, "seed": 7},
        "logging": {"wandb": False, "progress": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.pop("WANDB_API_KEY", None)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def launcher_cmd(config: Path, nproc: int, *overrides: str) -> list[str]:
    if nproc == 0:  # plain python, one process
        return [sys.executable, "train.py", "--config", str(config), *overrides]
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "train.py", "--config",
            str(config), *overrides]


def train(config: Path, nproc: int = 2, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(launcher_cmd(config, nproc, *overrides), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def shm_buffers(cmd: list[str]) -> list[str]:
    """DeepSpeed CPU all-reduce buffers in /dev/shm of the launcher run `cmd` (named by its --master_port)."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def metrics(out_dir: Path) -> dict[int, dict]:
    """Last logged metrics per step (a resumed run re-logs steps after its checkpoint)."""
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["step"], {}).update(rec)
    return rows
