"""LoRA reward models: quickstart accuracy under the deepspeed launcher, the merged export (plain HF, no peft) and
the adapter give the same rewards, ZeRO-2 and ZeRO-3 on 2 CPU ranks, QLoRA refused on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from btrm.tiny import write_preference_jsonl

from trainhelp import DEEPSPEED, REPO, env, free_port, metrics, train, write_config

pytest.importorskip("peft")

CONVS = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Say hi in a friendly tone", "hey there, lovely to meet you!"),
    ("Is 30 degrees Celsius hot?", "Yes, 30 C is a hot day for most people."),
    ("Write HELLO in lowercase", "hello"),
]]

# The recipe's reward outside btrm: template, strip one BOS string, tokenize, logits[0][0]; prints the rewards and
# whether peft got imported along the way.
PLAIN_HF = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, convs = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
out = []
for c in convs:
    text = tok.apply_chat_template(c, tokenize=False)
    text = text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text
    with torch.no_grad():
        out.append(model(**tok(text, return_tensors="pt")).logits[0][0].item())
print(json.dumps({"rewards": out, "arch": type(model).__name__, "peft": "peft" in sys.modules}))
"""


def plain_hf_rewards(path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLAIN_HF, str(path), json.dumps(CONVS)], capture_output=True,
                          text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def adapter_model_rewards(adapter_dir) -> list[float]:
    """The unmerged peft model (base + adapter layers) on the same recipe."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from btrm.modeling import load_reward_model

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(load_reward_model(base, tok, attn_implementation="sdpa"), adapter_dir).eval()
    out = []
    for c in CONVS:
        text = tok.apply_chat_template(c, tokenize=False)
        text = text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text
        with torch.no_grad():
            out.append(model(**tok(text, return_tensors="pt")).logits[0][0].item())
    return out


def check_export(ckpt) -> list[float]:
    plain = plain_hf_rewards(ckpt)
    assert plain["arch"] == "LlamaForSequenceClassification" and not plain["peft"]
    adapter = adapter_model_rewards(ckpt / "adapter")
    assert plain["rewards"] == pytest.approx(adapter, abs=1e-5)
    from btrm import RewardModel

    assert RewardModel.from_pretrained(ckpt / "adapter").score(CONVS) == pytest.approx(adapter, abs=1e-5)
    return adapter


@pytest.fixture(scope="module")
def lora_quickstart(tmp_path_factory):
    """The quickstart recipe with LoRA r=8 under `deepspeed --num_gpus 1` (60 steps on synthetic:400)."""
    out = tmp_path_factory.mktemp("lora-quickstart")
    cmd = [DEEPSPEED, "--num_gpus", "1", "--master_port", str(free_port()), "train.py", "--config",
           "configs/quickstart.yaml", "--train.max_steps=60", f"--train.output_dir={out}",
           f"--data.cache_dir={out / 'cache'}", "--logging.wandb=false", "--logging.progress=false",
           "--data.sources=[{path: 'synthetic:400'}]", "--model.lora.r=8", "--optim.lr=5e-3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return out / "checkpoint-60", proc.stdout + proc.stderr


@pytest.mark.slow
def test_lora_quickstart_accuracy_and_export(lora_quickstart):
    ckpt, log = lora_quickstart
    meta = json.loads((ckpt / "btrm_meta.json").read_text())
    assert meta["heldout"]["eval/accuracy"] >= 0.90
    lo = meta["lora"]
    assert 0 < lo["trainable_params"] < lo["total_params"]
    assert f"{lo['trainable_params']} trainable parameters of {lo['total_params']}" in log
    assert "## Calibration" in (ckpt / "README.md").read_text() and "LoRA" in (ckpt / "README.md").read_text()
    rewards = check_export(ckpt)
    # the base named explicitly gives the same model
    from btrm import RewardModel

    base = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert RewardModel.from_pretrained(ckpt / "adapter", base=base).score(CONVS) == pytest.approx(rewards, abs=1e-5)


@pytest.mark.slow
def test_lora_zero2_and_zero3_on_two_ranks(tmp_path, tiny_llama_dir):
    data = write_preference_jsonl(tmp_path / "pairs.jsonl", 96, seed=3)
    outs = {}
    for stage in (2, 3):
        d = tmp_path / f"zero{stage}"
        d.mkdir()
        cfg = write_config(d, tiny_llama_dir, data, model={"lora": {"r": 4, "alpha": 8}},
                           optim={"lr": 1e-2}, train={"max_steps": 3}, deepspeed={"zero_stage": stage})
        train(cfg, 2)
        outs[stage] = d / "out"
        check_export(outs[stage] / "checkpoint-3")
    a, b = metrics(outs[2]), metrics(outs[3])
    for step in (1, 2, 3):  # the same data and init: ZeRO-3 partitioning changes nothing but where weights live
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-5), step


def test_qlora_refused_on_cpu(tmp_path, tiny_llama_dir):
    data = write_preference_jsonl(tmp_path / "pairs.jsonl", 16, seed=3)
    cfg = write_config(tmp_path, tiny_llama_dir, data, model={"lora": {"r": 4, "load_in_4bit": True}})
    proc = subprocess.run([sys.executable, "train.py", "--config", str(cfg)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: model.lora.load_in_4bit (QLoRA) needs a CUDA device"), proc.stderr[-2000:]
