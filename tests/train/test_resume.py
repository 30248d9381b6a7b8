"""Exact resume after kill -9, and a kill during a checkpoint write never hurts the last good checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from btrm.tiny import write_preference_jsonl
from btrm.train.checkpoint import latest_checkpoint

from trainhelp import REPO, env, launcher_cmd, metrics, train, write_config

STEPS = 12


def _config(tmp_path, model_dir, name, checkpoint_every=4, **model):
    d = tmp_path / name
    d.mkdir()
    data_file = write_preference_jsonl(tmp_path / "pairs.jsonl", 200, seed=1)
    return write_config(d, model_dir, data_file, model=model,
                        optim={"lr": 2e-3, "scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01},
                        train={"max_steps": STEPS, "global_batch_pairs": 16},
                        checkpoint={"every": checkpoint_every, "keep_last": 5}, deepspeed={"zero_stage": 2}), d / "out"


@pytest.mark.slow
@pytest.mark.parametrize("model", [{}, {"lora": {"r": 4, "alpha": 8}}], ids=["full", "lora"])
def test_kill9_then_resume_is_exact(tmp_path, tiny_llama_dir, model):
    if model.get("lora"):
        pytest.importorskip("peft")
    straight_cfg, straight_out = _config(tmp_path, tiny_llama_dir, "straight", **model)
    train(straight_cfg, 2)

    killed_cfg, killed_out = _config(tmp_path, tiny_llama_dir, "killed", **model)
    proc = subprocess.Popen(launcher_cmd(killed_cfg, 2), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while latest_checkpoint(killed_out) is None:
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, no chance to clean up
    proc.wait()
    resumed_from = latest_checkpoint(killed_out)
    assert resumed_from.name != f"checkpoint-{STEPS}", "killed too late to test resume"
    out = train(killed_cfg, 2)
    assert f"resumed from {resumed_from}" in out.stdout + out.stderr

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
