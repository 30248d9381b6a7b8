"""btrm.cpu: the trainer's CPU process settings (BENCHMARKS.md: threads per rank 1.45x tokens/s for 2 ranks on 2
cores; retained memory removes the page faults that made a packed 16K row slower than its segments)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from btrm.cpu import share_cpu_threads

PROBE = r"""
import json, resource, sys, torch
from btrm.cpu import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
def step():  # like a training step's activations: several 16 MiB tensors alive at once, then all freed
    xs = [torch.ones(4 * 1024 * 1024) * (i + 1) for i in range(6)]
    return float(sum(x[0] for x in xs))
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator")
def test_retained_memory_is_reused_without_page_faults():
    # Control: a fixed mmap threshold makes glibc map every 16 MiB block afresh and fault all its pages in
    # (5 steps x 12 blocks x 4096 pages = 245,760). glibc's own dynamic threshold makes the plain default vary
    # from run to run (8K to 245K faults measured on one machine), so the control pins it.
    control = probe("default", MALLOC_MMAP_THRESHOLD_="131072")
    assert control["faults"] > 200_000, control
    retained = probe("retain")
    assert retained["applied"] is True
    # Blocks come back from the heap; at most a heap growth or two (2 blocks = 8K faults seen) in steady state.
    assert retained["faults"] < 20_000, (retained, control)


def test_user_malloc_settings_are_left_alone():
    assert probe("retain", MALLOC_ARENA_MAX="2")["applied"] is False


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
    share_cpu_threads()
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)


def test_explicit_omp_and_single_rank_are_left_alone(monkeypatch, threads):
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    share_cpu_threads()
    assert torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    torch.set_num_threads(5)
    share_cpu_threads()
    assert torch.get_num_threads() == 5


def test_retain_is_a_no_op_off_cpu():
    from btrm.cpu import retain_freed_memory

    assert retain_freed_memory("cuda") is False  # the caching CUDA allocator needs nothing; glibc is untouched
