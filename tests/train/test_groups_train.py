"""Ranked groups on a real `deepspeed` run (issue 13): pairs and groups of 4 mixed in one source list; 2 CPU ranks
and 1 rank, packed under different token budgets, take the same steps (the step loss is the mean over the step's
comparisons, so neither packing, micro-batching nor world size moves it). Plain SGD as in test_share_prompt."""

import pytest

from btrm.tiny import make_group_rows, write_jsonl, write_preference_jsonl

from trainhelp import metrics, train, write_config


@pytest.mark.slow
def test_mixed_pairs_and_groups_two_ranks_equal_one(tmp_path, tiny_llama_dir):
    pairs = write_preference_jsonl(tmp_path / "pairs.jsonl", 40, seed=2)
    groups = write_jsonl(tmp_path / "groups.jsonl", make_group_rows(40, seed=2))
    out = {}
    for nproc, max_tokens in ((2, 900), (1, 500)):
        run = tmp_path / f"ranks-{nproc}"
        run.mkdir()
        config = write_config(run, tiny_llama_dir, pairs, optim={"name": "sgd", "lr": 1.0, "grad_clip": 0.0},
                              data={"sources": [{"path": str(pairs)}, {"path": str(groups)}], "max_tokens": max_tokens,
                                    "eval_fraction": 0.2},
                              train={"max_steps": 3, "global_batch_pairs": 12, "eval_every": 2},
                              deepspeed={"zero_stage": 2})
        train(config, nproc)
        out[nproc] = metrics(run / "out")
    two, one = out[2], out[1]
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in (1, 2, 3):
        assert two[step]["pairs"] == one[step]["pairs"] > 12  # comparisons: a group of 4 gives 6
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "grad_norm"):
            assert abs(two[step][key] - one[step][key]) <= 1e-5, (step, key, two[step][key], one[step][key])
    assert one[1]["micro_steps"] >= 2  # the 1-rank run accumulated over several packed rows
    for key in ("eval/loss", "eval/top1_accuracy", "eval/kendall_tau", "eval/longer_wins_accuracy"):
        assert abs(two[2][key] - one[2][key]) <= 1e-5, key
    assert two[2]["eval/groups"] == one[2]["eval/groups"] > 0
