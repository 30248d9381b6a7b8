"""The distributed layout of this process, set up once and passed to whoever needs it.

`rank` / `world_size` count every process (logging, checkpoint writing and collectives use them);
`dp_rank` / `dp_size` count the data-parallel replicas the step's items are dealt to. With sequence parallelism
(`train.sequence_parallel_size` = SP > 1, btrm.sequence_parallel) the SP consecutive ranks g*SP .. g*SP + SP - 1
form replica g (the grouping DeepSpeed's `parallel_state_sp` builds): they share a dp rank, run the same
micro-steps and split each packed row between them, rank `sp_rank` of the group holding its `sp_rank`-th slice.
`setup_distributed` is the one place that decides the split.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from btrm.cpu import retain_freed_memory, share_cpu_threads
from btrm.errors import UserError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_rank: int
    dp_size: int
    sp_rank: int = 0
    sp_size: int = 1
    sp_group: object = None
    """The process group of this rank's SP group (set by btrm.sequence_parallel.enable; None without SP)."""

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self._comm_device())
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        """End the process group together after a finished run. A gloo group left for interpreter exit can abort
        a rank (SIGABRT, seen once in a 2-rank CPU run) while another still reads from it."""
        if torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's CPU all-reduce: /dev/shm/<prefix>_<uid>_<addr>_<port>_<rank>


def release_shm_buffers(rank: int, shm: Path = Path("/dev/shm")) -> None:
    """Leave no DeepSpeed CPU all-reduce buffers in /dev/shm, however the run ends (docs/design.md, DeepSpeed).

    Each rank creates one buffer (about 66 MiB) in init_distributed and DeepSpeed never removes it, so every
    run used to leave `world` of them behind, kill -9 or not. Once all ranks have mapped each other's buffers
    (the barrier), the names are no longer needed: each rank unlinks its own, and the memory goes when the last
    process unmaps it at exit. Local rank 0 also removes buffers of our user that no live process maps (left by
    runs before this fix or killed before the barrier) and that are over a minute old; a live run's buffers are
    mapped, so they are kept."""
    torch.distributed.barrier()
    own = shm / f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    own.unlink(missing_ok=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        old = time.time() - 60  # a buffer is mapped a moment after it is created: spare young ones
        stale = {p for p in shm.glob(f"{SHM_PREFIX}_{os.getuid()}_*") if _mtime(p) < old}
        if stale:
            for path in stale - _mapped_paths():
                path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return math.inf


def _mapped_paths() -> set[Path]:
    """Files under /dev/shm that any process we can see has mapped."""
    out = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours
            continue
        out.update(Path(line.split(maxsplit=5)[5]) for line in text.splitlines()
                   if "/dev/shm/" in line and len(line.split(maxsplit=5)) == 6)
    return out


def setup_distributed(timeout_s: float = 600.0, sp_size: int = 1) -> Dist:
    """Works under the deepspeed launcher, torchrun, and a plain `python train.py` (one process). `timeout_s` bounds
    every collective (DeepSpeed's default is 10 minutes); `sp_size` ranks share each data-parallel replica."""
    from datetime import timedelta

    import deepspeed

    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world % sp_size:
        raise UserError(f"train.sequence_parallel_size={sp_size} does not divide the world size {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cpu_threads()
        retain_freed_memory()
        release_shm_buffers(rank)
    return Dist(rank, world, local_rank, device, dp_rank=rank // sp_size, dp_size=world // sp_size,
                sp_rank=rank % sp_size, sp_size=sp_size)
