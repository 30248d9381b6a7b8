"""The distributed layout of this process, set up once and passed to whoever needs it.

`rank` / `world_size` count every process (logging, checkpoint writing and collectives use them);
`dp_rank` / `dp_size` count the data-parallel replicas the step's items are dealt to. Today every rank is its own
replica (dp == global). Sequence parallelism will put several ranks in one replica: they share a dp rank, split
each packed row between them, and `setup_distributed` is the one place that decides the split.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from btrm.cpu import retain_freed_memory, share_cpu_threads


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_rank: int
    dp_size: int

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

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> Dist:
    """Works under the deepspeed launcher, torchrun, and a plain `python train.py` (one process)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        share_cpu_threads()
        retain_freed_memory()
    return Dist(rank, world, local_rank, device, dp_rank=rank, dp_size=world)
