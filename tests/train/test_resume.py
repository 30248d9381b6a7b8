"""Exact resume after kill -9, and a kill during a checkpoint write never hurts the last good checkpoint."""

import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from btrm.tiny import write_preference_jsonl
from btrm.train.checkpoint import latest_checkpoint

from trainhelp import REPO, env, launcher_cmd, metrics, shm_buffers, train, write_config

STEPS = 12


def _config(tmp_path, model_dir, name, checkpoint_every=4, sp=1, **model):
    d = tmp_path / name
    d.mkdir()
    data_file = write_preference_jsonl(tmp_path / "pairs.jsonl", 200, seed=1)
    return write_config(d, model_dir, data_file, model=model,
                        optim={"lr": 2e-3, "scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01},
                        train={"max_steps": STEPS, "global_batch_pairs": 16, "sequence_parallel_size": sp},
                        checkpoint={"every": checkpoint_every, "keep_last": 5}, deepspeed={"zero_stage": 2}), d / "out"


@pytest.mark.slow
@pytest.mark.parametrize("model, sp", [({}, 1), ({"lora": {"r": 4, "alpha": 8}}, 1), ({}, 2)],
                         ids=["full", "lora", "sequence-parallel"])
def test_kill9_then_resume_is_exact(tmp_path, tiny_llama_dir, model, sp):
    if model.get("lora"):
        pytest.importorskip("peft")
    straight_cfg, straight_out = _config(tmp_path, tiny_llama_dir, "straight", sp=sp, **model)
    assert shm_buffers(train(straight_cfg, 2).args) == []  # a run that ended normally left none

    killed_cfg, killed_out = _config(tmp_path, tiny_llama_dir, "killed", sp=sp, **model)
    proc = subprocess.Popen(launcher_cmd(killed_cfg, 2), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while latest_checkpoint(killed_out) is None:
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, no chance to clean up
    proc.wait()
    assert shm_buffers(proc.args) == []
    resumed_from = latest_checkpoint(killed_out)
    assert resumed_from.name != f"checkpoint-{STEPS}", "killed too late to test resume"
    with _shm_left_by_older_runs() as (stale, live):
        out = train(killed_cfg, 2)
        assert not stale.exists() and live.exists()  # the restart removed the dead run's buffer, kept the live one
    assert f"resumed from {resumed_from}" in out.stdout + out.stderr
    assert shm_buffers(out.args) == []
    steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one row per logged step: the killed run's rows after its checkpoint
    # were dropped on resume, not kept beside the resumed run's

    a, b = metrics(straight_out), metrics(killed_out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
        assert abs(a[step]["lr"] - b[step]["lr"]) <= 1e-12, step
    wa = load_file(straight_out / f"checkpoint-{STEPS}" / "model.safetensors")
    wb = load_file(killed_out / f"checkpoint-{STEPS}" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if model.get("lora"):  # the adapter too
        wa, wb = (load_file(o / f"checkpoint-{STEPS}" / "adapter" / "adapter_model.safetensors")
                  for o in (straight_out, killed_out))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@contextlib.contextmanager
def _shm_left_by_older_runs():
    """Two DeepSpeed buffers of our user as runs before the cleanup left them: one of a dead run (an hour old,
    mapped by nobody) and one that a live process (this one) maps."""
    stale = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0")
    live = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_2_0")
    for path in (stale, live):
        path.write_bytes(b"\0" * 4096)
    os.utime(stale, (time.time() - 3600,) * 2)
    os.utime(live, (time.time() - 3600,) * 2)
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
        try:
            yield stale, live
        finally:
            stale.unlink(missing_ok=True)
            live.unlink(missing_ok=True)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import btrm.train.checkpoint as c
orig, calls = c._fsync_dir, []
def dying_fsync(path):  # runs after every file of the checkpoint is written, before COMPLETE and the rename
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(path)
c._fsync_dir = dying_fsync
from btrm.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, tiny_llama_dir):
    cfg, out = _config(tmp_path, tiny_llama_dir, "run")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, "--config", str(cfg),
                           "--train.max_steps=8"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / ".checkpoint-8.tmp").exists() and not (out / "checkpoint-8").exists()
    good = latest_checkpoint(out)
    assert good.name == "checkpoint-4"
    model = AutoModelForSequenceClassification.from_pretrained(good)  # complete and loadable
    assert model.config.num_labels == 1
    train(cfg, 0, "--train.max_steps=8")  # resumes from checkpoint-4, cleans the partial write
    assert latest_checkpoint(out).name == "checkpoint-8" and not (out / ".checkpoint-8.tmp").exists()


@pytest.mark.slow
def test_sigterm_finishes_step_saves_and_exits(tmp_path, tiny_llama_dir):
    cfg, out = _config(tmp_path, tiny_llama_dir, "run", checkpoint_every=0)
    proc = subprocess.Popen(launcher_cmd(cfg, 0, "--train.max_steps=100000"), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    saved = latest_checkpoint(out)
    assert saved is not None and f"stopped by signal at step {saved.name.split('-')[1]}" in text
    assert int(saved.name.split("-")[1]) == max(metrics(out))  # the step it finished is the step it saved


@pytest.mark.slow
def test_two_rank_sigterm_leaves_no_shm_buffers(tmp_path, tiny_llama_dir):
    """SIGTERM to the whole launched job (launcher and ranks), as a scheduler cancelling it does."""
    cfg, out = _config(tmp_path, tiny_llama_dir, "run", checkpoint_every=0)
    proc = subprocess.Popen(launcher_cmd(cfg, 2, "--train.max_steps=100000"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert shm_buffers(proc.args) == []
