"""The Skywork-Reward-V2 recipes: every file parses and states the paper's settings, and each trains 2 steps on
CPU with its model swapped for a tiny local model of the same family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from btrm.config import LossConfig, load_config
from btrm.tiny import build_tiny_model, write_preference_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "skywork-reward-v2"
RELEASED = ["llama-3.1-8b", "llama-3.1-8b-40m", "llama-3.2-1b", "llama-3.2-3b",
            "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"]
DEV = [name for name in RELEASED if not name.endswith("-40m")]
BASES = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct", "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B",
}


def family(name: str) -> str:
    """Tiny-model family (btrm.tiny.FAMILIES) of a recipe."""
    return "llama3.2" if name.startswith("llama-3.2") else "llama3" if name.startswith("llama-3.1") else "qwen3"


def test_recipe_set_is_complete():
    want = {f"{n}.yaml" for n in RELEASED} | {f"{n}-dev.yaml" for n in DEV}
    assert {p.name for p in RECIPES.glob("*.yaml")} == want


@pytest.mark.parametrize("name", RELEASED)
def test_final_recipe(name):
    cfg = load_config(RECIPES / f"{name}.yaml")
    assert cfg.model.name_or_path == BASES[name.removesuffix("-40m")]
    assert cfg.model.dtype == "bf16"
    assert cfg.optim.lr == pytest.approx(3e-6) and cfg.optim.scheduler == "constant"
    assert cfg.optim.warmup_steps == 0 and cfg.optim.warmup_ratio == 0
    assert cfg.train.global_batch_pairs == 10240
    assert cfg.train.loss == LossConfig()  # plain Bradley-Terry
    assert cfg.deepspeed.zero_stage == 1
    assert cfg.data.max_length == 16384 and cfg.data.max_tokens >= 2 * cfg.data.max_length
    assert cfg.data.sources[0].path == "Skywork/Skywork-Reward-Preference-80K-v0.2"
    assert [s.swap for s in cfg.data.sources] == ([False, True] if name.endswith("-40m") else [False])
    if name.startswith("llama-3.2"):  # the 3.2 template would otherwise write today's date
        assert cfg.data.chat_template_kwargs == {"date_string": "26 Jul 2024"}


@pytest.mark.parametrize("name", DEV)
def test_dev_recipe(name):
    final = load_config(RECIPES / f"{name}.yaml")
    cfg = load_config(RECIPES / f"{name}-dev.yaml")
    assert cfg.optim.lr == pytest.approx(1e-6 if name.endswith("8b") else 4e-6)
    assert cfg.optim.scheduler == "linear" and cfg.optim.warmup_ratio > 0
    assert cfg.train.global_batch_pairs == 256 and cfg.train.epochs == 1 and cfg.train.max_steps is None
    # everything else as in the final recipe
    assert (cfg.model, cfg.data, cfg.train.loss, cfg.deepspeed) == (final.model, final.data, final.train.loss,
                                                                      final.deepspeed)


LONG_CONTEXT = ROOT / "configs" / "long-context"


def test_long_context_recipe():
    """Qwen3-8B at 64K with Ulysses SP 8: each SP group's row (max_tokens x SP) holds a pair of two 64K
    conversations, SP divides the heads and 8 GPUs, and `btrm plan` fits it on 8 x 80 GB."""
    from btrm.plan import plan, resolve_arch, sp_layout_error

    assert [p.name for p in LONG_CONTEXT.glob("*.yaml")] == ["qwen3-8b-64k.yaml"]
    cfg = load_config(LONG_CONTEXT / "qwen3-8b-64k.yaml")
    sp = cfg.train.sequence_parallel_size
    assert cfg.model.name_or_path == BASES["qwen3-8b"] and cfg.model.gradient_checkpointing
    assert cfg.data.max_length == 65536 and sp == 8 and cfg.data.max_tokens * sp == 2 * cfg.data.max_length
    a, _ = resolve_arch(cfg.model.name_or_path)
    assert sp_layout_error(a, sp, 8) is None
    assert plan(cfg, a, gpus=8, nodes=1, gpu_memory_gib=80)["fits"]


def test_max_length_128k_has_no_cap():
    """data.max_length up to 131,072: the config takes it and a pair of two 131,072-token conversations is kept
    whole when the row holds it (max_tokens x SP)."""
    from btrm.data.dataset import fit_pair

    cfg = load_config(RECIPES / "qwen3-8b.yaml", ["--data.max_length=131072", "--data.max_tokens=262144"])
    c, r = [1] * 131072, [2] * 131072
    assert fit_pair(c, r, cfg.data.max_length, cfg.data.max_tokens, "drop", None) == (c, r, "ok")
    assert fit_pair(c + [1], r, cfg.data.max_length, cfg.data.max_tokens, "drop", None)[2] == "dropped"


# ----------------------------------------------------------------------------------------------------------------------
# 2 training steps per recipe on CPU, through the real entry point


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: build_tiny_model(f, root / f) for f in ("llama3", "llama3.2", "qwen3")}


@pytest.mark.slow
@pytest.mark.parametrize("name", RELEASED)
def test_recipe_trains_two_steps(name, tiny_models, tmp_path):
    data = write_preference_jsonl(tmp_path / "pairs.jsonl", 32, seed=0)
    sources = f"[{{path: {data}}}]"
    if name.endswith("-40m"):  # keep the recycled (swapped) source in play
        recycled = write_preference_jsonl(tmp_path / "recycled.jsonl", 16, seed=1)
        sources = f"[{{path: {data}}}, {{path: {recycled}, name: recycled, swap: true}}]"
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", str(RECIPES / f"{name}.yaml"),
           f"--model.name_or_path={tiny_models[family(name)]}", f"--data.sources={sources}",
           "--train.max_steps=2", "--train.global_batch_pairs=8", "--data.max_length=256", "--data.max_tokens=512",
           f"--data.cache_dir={tmp_path / 'cache'}", f"--train.output_dir={out}", "--logging.wandb=false"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert any(out.iterdir()), "the run wrote nothing to its output_dir"


def ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """A local stand-in in UltraFeedback's raw schema: `instruction`, 4 `completions` with nested ratings."""
    from btrm.tiny import make_group_rows

    rows = []
    for i, g in enumerate(make_group_rows(n, seed)):
        completions = [{"model": f"m{j}", "response": r, "fine-grained_score": 1.0 + s, "overall_score": 2.0 * s,
                        "annotations": {"helpfulness": {"Rating": str(1 + s)}}}
                       for j, (r, s) in enumerate(zip(g["responses"], g["scores"]))]
        rows.append({"source": "stand-in", "instruction": g["prompt"], "models": [c["model"] for c in completions],
                     "completions": completions})
    return rows


@pytest.mark.slow
def test_ultrafeedback_groups_recipe_trains_two_steps(tiny_qwen3_dir, tmp_path):
    import json

    from btrm.tiny import write_jsonl

    cfg = load_config(ROOT / "configs" / "ultrafeedback-groups.yaml")
    src = cfg.data.sources[0]
    assert src.format == "group" and cfg.train.loss.kind == "bt_pairs"
    data = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(40))
    sources = json.dumps([{"path": str(data), "name": src.name, "format": src.format, "columns": src.columns}])
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", str(ROOT / "configs" / "ultrafeedback-groups.yaml"),
           f"--model.name_or_path={tiny_qwen3_dir}", f"--data.sources={sources}", "--model.dtype=fp32",
           "--model.gradient_checkpointing=false", "--train.max_steps=2", "--train.global_batch_pairs=8",
           "--data.eval_fraction=0.2", f"--data.cache_dir={tmp_path / 'cache'}", f"--train.output_dir={out}",
           "--logging.wandb=false", "--logging.progress=false"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval/groups"] > 0 and "eval/top1_accuracy" in last
    assert "skipped" not in proc.stdout  # every stand-in row is a valid group
