"""scripts/gpu_check.sh in dry-run mode: the GPU check's code path on CPU, without DeepSpeed or datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The GPU machine has torch, transformers and triton only: make any import of DeepSpeed or datasets fail.
_NO_DS = """import sys
sys.modules["deepspeed"] = None
sys.modules["datasets"] = None
"""


def test_gpu_check_sh_uses_python3_by_default():
    assert 'PYTHON="${PYTHON:-python3}"' in (REPO / "scripts" / "gpu_check.sh").read_text()  # the GPU image's name


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_NO_DS)
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(shim))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("| model | mode |"))
    assert all(line.startswith("|") for line in lines[head:head + 8])  # the tables come last, then a verdict
    assert "self-test: reward_one_token_early" in proc.stdout
    assert lines[-1].startswith("correctness: passed; best packed MFU: tiny-a n/a")
    assert lines[-2] == "SP row: skipped: dry run on CPU: the SP row needs >= 2 GPUs (the CPU tests check SP numerics)"

    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] is True and res["device"].startswith("cpu")
    assert res["sequence_parallel"]["status"] == "skipped"
    assert res["correctness_passed"] is True
    tol = res["tolerance"]  # derived from the bf16-vs-fp32 floor (params cast, rotary buffers fp32), and printed
    assert tol["floor_abs"] > 0  # the bf16 path really was bf16
    assert tol["tol_abs"] == max(2 * tol["floor_abs"], 2 ** -7 * tol["max_abs_reward"])
    assert tol["tol_grad_rel"] == max(2 * tol["floor_grad_rel"], 2 ** -7)
    assert f"tolerance: rewards {tol['tol_abs']:.2e} = max(2 x floor {tol['floor_abs']:.2e}" in proc.stdout
    by_backend = {r["backend"]: r for r in res["correctness"]}
    assert set(by_backend) == {"btrm_varlen", "flash_attention_2", "sdpa", "btrm_segment", "eager"}
    for name in ("sdpa", "btrm_segment"):  # the CPU backends really ran, in bf16, within tolerance
        r = by_backend[name]
        assert r["status"] == "pass", r
        assert r["max_abs_diff"] <= tol["tol_abs"] and r["grad_rel_diff"] <= tol["tol_grad_rel"]
    assert by_backend["btrm_varlen"]["status"] == "skipped"
    shared = {r["backend"]: r for r in res["shared_prompt"]}  # each pair's prompt packed once: fewer tokens, same bar
    assert shared.keys() == by_backend.keys()
    for name in ("sdpa", "btrm_segment"):
        r = shared[name]
        assert r["status"] == "pass", r
        assert r["max_abs_diff"] <= tol["tol_abs"] and r["grad_rel_diff"] <= tol["tol_grad_rel"]
        assert r["tokens"] < by_backend[name]["tokens"]
    assert "| btrm_segment | shared prompt |" in proc.stdout
    # the self-test: both broken layouts FAIL the same check that the correct layout passes
    verdicts = {r["layout"]: r["status"] for r in res["self_test"]}
    assert verdicts == {"correct": "pass", "positions_not_restarting": "FAIL", "reward_one_token_early": "FAIL"}
    assert res["self_test_passed"] is True
    for r in res["self_test"]:
        if r["status"] == "FAIL":  # by a wide margin, not by rounding
            assert r["max_abs_diff"] > 10 * tol["tol_abs"], r

    rows = res["throughput"]
    assert {(r["model"], r["mode"], r["grad_ckpt"]) for r in rows} == {
        (m, mode, ckpt) for m in ("tiny-a", "tiny-b") for mode, ckpt in
        (("packed", False), ("packed", True), ("padded", False))}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["achieved_tflops"] > 0 and r["s_bar"] > 1
        assert "mfu" in r and r["mfu"] is None  # no peak FLOP/s known for a CPU
        assert (r["padding_share"] == 0) == (r["mode"] == "packed")
    # packed and padded runs trained on the same pairs
    assert len({(r["model"], r["real_tokens"]) for r in rows}) == 2
