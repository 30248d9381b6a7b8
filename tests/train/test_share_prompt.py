"""data.share_prompt on a real 2-rank `deepspeed` run equals the same run with it off, step for step.

Plain SGD (lr 1): the weights then differ only by the gradients' float-level differences, which a wrong mask or
position would raise to ~1e-3. Under AdamW the losses also agree to 1e-7 over 4 steps, but Adam scales a
near-zero gradient element up to about lr, so 2 of 170K weights differed by up to 8.7e-5 from summation order.
"""

import pytest
import torch
from safetensors.torch import load_file

from btrm.tiny import write_preference_jsonl

from trainhelp import metrics, train, write_config


@pytest.mark.slow
def test_two_rank_run_same_with_sharing_on_and_off(tmp_path, tiny_llama_dir):
    data_file = write_preference_jsonl(tmp_path / "pairs.jsonl", 120, seed=5)
    out = {}
    for share in (True, False):
        run = tmp_path / f"share-{share}"
        run.mkdir()
        config = write_config(run, tiny_llama_dir, data_file, optim={"name": "sgd", "lr": 1.0, "grad_clip": 0.0},
                              data={"max_tokens": 400, "eval_fraction": 0.2, "share_prompt": share},
                              train={"max_steps": 4, "global_batch_pairs": 24, "eval_every": 2},
                              deepspeed={"zero_stage": 2})
        train(config, 2)
        out[share] = run / "out"
    on, off = metrics(out[True]), metrics(out[False])
    assert sorted(on) == sorted(off) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "grad_norm"):
            assert abs(on[step][key] - off[step][key]) <= 1e-5, (step, key, on[step][key], off[step][key])
        assert on[step]["prompt_tokens_saved"] > 0.2 and off[step]["prompt_tokens_saved"] == 0.0
        assert on[step]["tokens_per_s"] * on[step]["step_time_s"] == pytest.approx(
            off[step]["tokens_per_s"] * off[step]["step_time_s"])  # the same pairs, counted the same
    for step in (2, 4):
        assert abs(on[step]["eval/loss"] - off[step]["eval/loss"]) <= 1e-5
    w_on, w_off = (load_file(out[s] / "checkpoint-4" / "model.safetensors") for s in (True, False))
    assert set(w_on) == set(w_off)
    for name in w_on:
        assert torch.allclose(w_on[name].float(), w_off[name].float(), rtol=0, atol=1e-5), name
