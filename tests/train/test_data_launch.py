"""Data preparation under the real launchers: no collective waits on tokenizing, and node-local caches."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from btrm.tiny import write_preference_jsonl

from trainhelp import REPO, env, free_port, metrics, train, write_config


@pytest.mark.slow
def test_tokenizing_longer_than_the_collective_timeout(tmp_path, tiny_llama_dir):
    model = tmp_path / "slow-template"
    shutil.copytree(tiny_llama_dir, model)
    template = model / "chat_template.jinja"
    # 7.5M empty loop turns per rendered conversation: tokenizing 64 pairs took ~24 s on an idle 2-core machine, a
    # few times the 10 s collective timeout (a third of that once finished in 8 s, under the timeout; a tighter
    # timeout can fail a training step's collective when the shared machine stalls one rank)
    template.write_text("{%- for _ in range(7500) %}{%- for _ in range(1000) %}{%- endfor %}{%- endfor %}"
                        + template.read_text())
    data = write_preference_jsonl(tmp_path / "d.jsonl", 64)
    config = write_config(tmp_path, model, data, train={"max_steps": 2, "global_batch_pairs": 8},
                          deepspeed={"timeout_s": 10}, checkpoint={"save_final": False})
    proc = train(config, 2)
    took = float(re.search(r"tokenized data cached in \S+ \((\d+) s\)", proc.stdout + proc.stderr).group(1))
    assert took > 10 and len(metrics(tmp_path / "out")) == 2


@pytest.mark.slow
def test_two_nodes_with_node_local_caches_equal_one_node(tmp_path, tiny_llama_dir):
    data = write_preference_jsonl(tmp_path / "d.jsonl", 120, seed=3)
    config = write_config(tmp_path, tiny_llama_dir, data, data={"eval_fraction": 0.1},
                          train={"max_steps": 3, "global_batch_pairs": 16}, checkpoint={"save_final": False})
    port, torchrun = free_port(), str(Path(sys.executable).with_name("torchrun"))
    nodes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "train.py", "--config", str(config), f"--data.cache_dir={tmp_path / f'node{n}'}",
         f"--train.output_dir={tmp_path / 'two-nodes'}"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    for n in (0, 1):  # each node built its own cache, once
        built = [d for d in (tmp_path / f"node{n}").iterdir() if (d / "done.json").exists()]
        assert len(built) == 1 and not list((tmp_path / f"node{n}").glob("*.tmp"))
    train(config, 2, f"--train.output_dir={tmp_path / 'one-node'}")
    two, one = metrics(tmp_path / "two-nodes"), metrics(tmp_path / "one-node")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-6, abs=1e-7)
