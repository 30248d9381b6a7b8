"""CPU ranks on one machine split its cores (BENCHMARKS.md: 1.45x tokens/s for 2 ranks on 2 cores)."""

import os

import pytest
import torch

from btrm.train.trainer import _share_cpu_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("var", ["LOCAL_SIZE", "LOCAL_WORLD_SIZE"])  # deepspeed launcher, torchrun
def test_local_ranks_share_cores(monkeypatch, threads, var):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv(var, "2")
    torch.set_num_threads(7)
    _share_cpu_threads()
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)


def test_explicit_omp_and_single_rank_are_left_alone(monkeypatch, threads):
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    _share_cpu_threads()
    assert torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    torch.set_num_threads(5)
    _share_cpu_threads()
    assert torch.get_num_threads() == 5
