"""The embedded default: the quickstart recipes learn a real preference signal that length alone does not."""

import pytest

from trainhelp import REPO, metrics, train


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["quickstart.yaml", "quickstart-qwen3.yaml"])
def test_quickstart_learns(tmp_path, recipe):
    out = tmp_path / "out"
    proc = train(REPO / "configs" / recipe, 1, f"--train.output_dir={out}", f"--data.cache_dir={tmp_path / 'c'}",
                 "--logging.wandb=false", "--logging.progress=false", timeout=1800)  # slow shared CI cores
    final = metrics(out)[max(metrics(out))]
    assert final["eval/pairs"] >= 300
    assert final["eval/accuracy"] >= 0.90, final
    assert final["eval/longer_wins_accuracy"] <= 0.60, final  # the length-only rule on the same held-out pairs
    assert "reward model saved to" in proc.stdout
