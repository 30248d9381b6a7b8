import pytest

from btrm.data.packing import best_fit_decreasing, pack_windows, packing_efficiency, plan_step
from btrm.tiny import lognormal_pair_sizes


def test_bfd_fill_on_long_tail():
    sizes = lognormal_pair_sizes()
    assert len(sizes) >= 20000
    bins = pack_windows(sizes, 16384, window=512)
    assert packing_efficiency(bins, sizes, 16384) >= 0.98
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # every pair once, whole
    assert all(sum(sizes[i] for i in b) <= 16384 for b in bins)


@pytest.mark.parametrize("batch, world", [(256, 8), (1024, 8), (2048, 8), (10240, 64), (37, 2), (3, 4)])
def test_step_plan_equal_micro_steps_balanced_tokens(batch, world):
    sizes = lognormal_pair_sizes()
    worst = 0.0
    for start in range(0, min(len(sizes), 8 * batch) - batch + 1, batch):
        sz = sizes[start:start + batch]
        plan = plan_step(sz, 16384, world)
        assert len({len(r) for r in plan}) == 1  # same number of micro-steps on every rank
        flat = [i for r in plan for b in r for i in b]
        assert sorted(flat) == list(range(len(sz)))  # no pair split, dropped or duplicated
        assert all(sum(sz[i] for i in b) <= 16384 for r in plan for b in r)
        loads = [sum(sz[i] for b in r for i in b) for r in plan]
        if len(sz) >= 4 * world:  # with fewer pairs than that, balance is bounded by single pairs
            worst = max(worst, (max(loads) - min(loads)) / max(loads))
    assert worst <= 0.05


def test_fewer_pairs_than_ranks_gives_empty_micro_steps_only_then():
    plan = plan_step([10, 20], 100, 4)
    assert [len(r) for r in plan] == [1, 1, 1, 1]
    assert sum(1 for r in plan for b in r if not b) == 2


def test_item_over_capacity_raises():
    with pytest.raises(ValueError, match="exceeds"):
        best_fit_decreasing([5, 200], 100)


def test_pad_pairs_layout():
    import torch

    from btrm.data.packing import pad_pairs

    ids, mask = pad_pairs([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0], [7, 8, 9, 10]]  # chosen rows, then rejected
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
