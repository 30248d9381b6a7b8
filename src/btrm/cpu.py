"""Process settings for running on CPU: threads per rank and the C allocator.

Both matter more than any kernel choice on a small machine; see BENCHMARKS.md ("CPU threads per rank", "Packed
training forward+backward on CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def share_cpu_threads() -> None:
    """CPU ranks on one machine split its cores instead of each taking all of them.

    torch defaults every process to one thread per core, so N local ranks run N x cores threads that preempt each
    other. An explicit OMP_NUM_THREADS (e.g. from `deepspeed --bind_cores_to_rank`) is left alone.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local))


def retain_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Keep freed tensor memory in the process for reuse instead of handing it back to the OS (glibc only).

    Process-wide, so it is called where btrm owns the process (the trainer, `btrm score`, `btrm serve`,
    `btrm eval`) and only when the model runs on ``device`` "cpu"; elsewhere it does nothing.

    glibc serves large blocks (a packed 16K-token row's activations are tens of MB each) with mmap and unmaps
    them on free, so every step faults all of its activation memory in again: about 490K page faults and 1.2 s of
    system time per 16K-token forward+backward of a 4-layer, 256-wide model, which made a packed row slower than
    its segments run one by one. Serving every block from the heap and not trimming it removes that. Returns
    whether the setting was applied; any MALLOC_* variable in the environment means the user chose, so nothing is
    changed. Scoring (`scripts/bench_score.py`, 4 x 256 model): 30.8 conversations/s with it, 25.8 without, and
    1.2 s against 13.2 s of system time over the run. Library users who score on CPU can call it themselves.
    """
    if torch.device(device).type != "cpu" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    log.debug("glibc malloc: mmap off, trim threshold 2 GiB (%s)", "applied" if ok else "refused")
    return ok
