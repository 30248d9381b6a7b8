import glob
import subprocess
import sys

import pytest

from btrm.tiny import write_preference_jsonl

from trainhelp import REPO, env, train, write_config


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics(tmp_path, tiny_llama_dir):
    data = write_preference_jsonl(tmp_path / "pairs.jsonl", 80)
    cfg = write_config(tmp_path, tiny_llama_dir, data, logging={"wandb": True, "project": "btrm-test",
                                                                "tags": ["ci"], "progress": True},
                       data={"eval_fraction": 0.2, "max_tokens": 512}, train={"max_steps": 3})
    proc = train(cfg, 0)  # plain `python train.py`: one process, no launcher
    runs = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, proc.stdout[-2000:]
    blob = open(runs[0], "rb").read()
    for key in (b"loss", b"accuracy", b"tokens_per_s", b"packing", b"eval/accuracy", b"grad_norm"):
        assert key in blob, key
    assert "reward model saved to" in proc.stdout
    run_dir = runs[0].rsplit("/", 1)[0]
    assert f"wandb sync {run_dir}" in proc.stdout  # the user is told where the offline run is and how to upload it


def test_train_cli_rejects_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: x}\ndata: {sources: [{path: a.jsonl}]}\n")
    p = subprocess.run([sys.executable, "train.py", "--config", str(cfg), "--optim.learning_rate=1"], cwd=REPO,
                       env=env(), capture_output=True, text=True)
    assert p.returncode == 2 and "optim.learning_rate" in p.stderr


def test_train_cli_counts_responses_identical_once_rendered(tmp_path, tiny_llama_dir):
    """Llama-3's template trims message content: "yes" and "  yes\\n" render to the same ids, so the pair teaches
    nothing. Strict training stops naming it; the data report (prepare_data) counts it as identical_responses."""
    import json

    from transformers import AutoTokenizer

    from btrm.config import DataConfig, SourceConfig
    from btrm.data.dataset import prepare_data

    u = {"role": "user", "content": "hi"}
    data = write_preference_jsonl(tmp_path / "d.jsonl", 8)
    with data.open("a") as f:
        f.write(json.dumps({"chosen": [u, {"role": "assistant", "content": "yes"}],
                            "rejected": [u, {"role": "assistant", "content": "  yes\n"}]}) + "\n")
    cfg = write_config(tmp_path, tiny_llama_dir, data, data={"strict": True})
    p = subprocess.run([sys.executable, "train.py", "--config", str(cfg)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].endswith(f"{data}:9: field 'rejected': identical_responses "
                                                      "(the same tokens as chosen once rendered)")
    prepared = prepare_data(DataConfig(sources=[SourceConfig(path=str(data), name="d")], cache_dir=str(tmp_path / "c")),
                            AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert prepared.report["train"]["skipped"] == {"d": {"identical_responses": 1}}
    assert prepared.report["train"]["kept"] == {"d": 8} and len(prepared.train) == 8
