"""Item-aware token-budget packing (an item is a pair, or a ranked group of responses).

A step's items are packed whole (a pair's chosen and rejected, a group's responses, together) into bins of at most
`max_tokens` tokens by best-fit decreasing, then the bins are dealt to ranks so that every rank runs the same
number of micro-steps with balanced token loads. A packed micro-batch is one row: sequences concatenated,
`position_ids` restarting at 0 for each, and each sequence's end index, where its reward is read.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from btrm.data.prefix import MIN_PREFIX, PrefixLayout, shared_row



# ----------------------------------------------------------------------------------------------------------------------
# Bin packing


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (indices into `sizes`) into bins of `capacity` by best-fit decreasing.

    Each bin is a list of item indices. An item larger than capacity raises (callers drop over-long pairs first).
    O(n log n): bins are kept in a sorted list of (free space, bin id).
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted by free space
    for i in order:
        s = int(sizes[i])
        if s > capacity:
            raise ValueError(f"item {i} of {s} tokens exceeds the bin capacity {capacity}")
        j = bisect.bisect_left(free, (s, -1))  # tightest bin that still fits
        if j < len(free):
            room, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (room - s, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - s, len(bins) - 1))
    return bins


def worst_fit_decreasing(sizes: Sequence[int], capacity: int, count: int) -> list[list[int]] | None:
    """Spread items over exactly `count` bins, largest item to the least-loaded bin: balanced loads.

    Returns None when an item fits in no bin (the least-loaded bin is the only candidate worth checking).
    """
    heap = [(0, b) for b in range(count)]
    bins: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, b = heapq.heappop(heap)
        if load + sizes[i] > capacity:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + int(sizes[i]), b))
    return bins


def split_largest(bins: list[list[int]], sizes: Sequence[int], count: int) -> list[list[int]]:
    """Split bins (largest first, only bins with >= 2 items) until there are `count` bins, if possible."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        candidates = [k for k, b in enumerate(bins) if len(b) >= 2]
        if not candidates:
            break
        k = max(candidates, key=lambda k: sum(sizes[i] for i in bins[k]))
        items = sorted(bins.pop(k), key=lambda i: -sizes[i])
        a, b, ta, tb = [], [], 0, 0
        for i in items:  # greedy halving by tokens
            if ta <= tb:
                a.append(i)
                ta += sizes[i]
            else:
                b.append(i)
                tb += sizes[i]
        bins.extend([a, b])
    return bins


def assign_to_ranks(bins: list[list[int]], sizes: Sequence[int], world_size: int) -> list[list[list[int]]]:
    """Deal bins to ranks: equal micro-step counts, balanced tokens (largest bin to the lightest rank with room).

    Bin counts that do not divide by `world_size` are first evened out by splitting the fullest bins; a rank
    gets an empty micro-step (an empty list) only when there are fewer pairs than needed to avoid it.
    """
    bins = [b for b in bins if b]
    steps = max(1, -(-len(bins) // world_size))
    bins = split_largest(bins, sizes, steps * world_size)
    loads = [0] * world_size
    out: list[list[list[int]]] = [[] for _ in range(world_size)]
    for b in sorted(bins, key=lambda b: -sum(sizes[i] for i in b)):
        r = min((r for r in range(world_size) if len(out[r]) < steps), key=lambda r: (loads[r], r))
        out[r].append(b)
        loads[r] += sum(sizes[i] for i in b)
    for r in range(world_size):
        # heaviest first on every rank: same order everywhere, padding micro-steps last
        out[r].sort(key=lambda b: -sum(sizes[i] for i in b))
        out[r].extend([] for _ in range(steps - len(out[r])))
    return out


def plan_step(pair_sizes: Sequence[int], capacity: int, world_size: int) -> list[list[list[int]]]:
    """Pack one step's pairs (given their chosen+rejected token counts) -> per rank, per micro-step, pair indices.

    Best-fit decreasing finds how few bins suffice; rounded up to a multiple of the world size, the pairs are
    then spread over exactly that many bins with balanced loads (so ranks finish their micro-steps together).
    If balancing cannot place every pair, the best-fit bins are split to the needed count instead.
    """
    tight = best_fit_decreasing(pair_sizes, capacity)
    count = max(1, -(-len(tight) // world_size)) * world_size
    balanced = worst_fit_decreasing(pair_sizes, capacity, count)
    return assign_to_ranks(balanced if balanced is not None else tight, pair_sizes, world_size)


def pack_windows(pair_sizes: Sequence[int], capacity: int, window: int) -> list[list[int]]:
    """Best-fit decreasing over consecutive windows of `window` pairs (used for eval/scoring streams)."""
    bins: list[list[int]] = []
    for start in range(0, len(pair_sizes), window):
        chunk = pair_sizes[start:start + window]
        bins.extend([[start + i for i in b] for b in best_fit_decreasing(chunk, capacity)])
    return bins


# ----------------------------------------------------------------------------------------------------------------------
# Collation


@dataclass
class PackedBatch:
    """One packed row of sequences and the layout of the items (pairs, later groups) they belong to.

    Item i owns sequences ``item_offsets[i]:item_offsets[i + 1]`` of the row, and ``ranks`` gives each sequence's
    place in its item's preference order, 0 = best: a pair is [chosen, rejected] with ranks [0, 1]; a ranked
    group of K responses has K sequences with ranks 0..K-1. `scores` gives a rated group's scores (higher is
    better, ties allowed; NaN for items ordered by rank alone, such as pairs). Objectives read rewards through
    this layout (`at_rank`, `best_wins`, `btrm.loss.comparisons`), never through positions in the row. A batch
    without items (the scorer's) only has the row.

    With `prefix` set (`collate(..., share=True)`), each item's shared prompt is in the row once
    (`btrm.data.prefix`): `cu_seqlens` then bounds the row's segments (prompts and branches), `prefix` says which
    segment attends to which and where each sequence's reward is read.
    """

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # [n_seq + 1] int32, sequence boundaries
    max_seqlen: int
    margins: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n_items] float (0 where absent)
    item_offsets: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))  # [n_items + 1]
    ranks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [n_seq], 0 = best
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n_seq] float, NaN = unscored item
    item_ids: list[int] = field(default_factory=list)  # dataset indices of the items
    sources: list[str] = field(default_factory=list)
    categories: list[str | None] = field(default_factory=list)
    prefix: PrefixLayout | None = None  # shared-prefix layout, None when every sequence is packed whole

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def ends(self) -> torch.Tensor:
        """Index of each sequence's last token in the row (where its reward is read)."""
        if self.prefix is not None:
            return torch.tensor(self.prefix.ends, dtype=torch.long, device=self.cu_seqlens.device)
        return self.cu_seqlens[1:].long() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def at_rank(self, rewards: torch.Tensor, rank: int) -> torch.Tensor:
        """[n_items] reward of each item's sequence of this rank (pairs: 0 = chosen, 1 = rejected)."""
        idx = torch.nonzero(self.ranks == rank).squeeze(-1)
        if len(idx) != self.n_items:
            raise ValueError(f"{len(idx)} sequences of rank {rank} for {self.n_items} items")
        return rewards.index_select(0, idx.to(rewards.device))

    def best_wins(self, rewards: torch.Tensor) -> torch.Tensor:
        """[n_items] bool: the rank-0 sequence out-scores every other sequence of its item (a tie loses)."""
        item = torch.repeat_interleave(torch.arange(self.n_items), self.item_offsets.diff()).to(rewards.device)
        others = self.ranks.to(rewards.device) != 0
        rest = torch.full((self.n_items,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
        rest = rest.scatter_reduce(0, item[others], rewards[others], "amax")
        return self.at_rank(rewards, 0) > rest


def pack_sequences(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Concatenate token lists into one row: (input_ids [1,T], position_ids [1,T], cu_seqlens, max_seqlen).

    No sequences give an empty row (a rank's empty micro-step)."""
    if not seqs:
        return torch.zeros((1, 0), dtype=torch.long), torch.zeros((1, 0), dtype=torch.long), \
            torch.zeros(1, dtype=torch.int32), 0
    lengths = [len(s) for s in seqs]
    if any(n == 0 for n in lengths):
        raise ValueError("cannot pack an empty sequence")
    ids = torch.tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]), dtype=torch.long)
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(np.cumsum(lengths), dtype=torch.int32)
    return ids[None], pos[None], cu, max(lengths)


def collate(items: Sequence[Sequence[Sequence[int]]], *, ranks: Sequence[Sequence[int]] | None = None,
            scores: Sequence[Sequence[float] | None] | None = None, item_ids=None, margins=None, sources=None,
            categories=None, share: bool = False, min_prefix: int = MIN_PREFIX) -> PackedBatch:
    """Pack items (each a list of token-id sequences, best first unless `ranks` says otherwise) into one row.

    `scores`: per item, its sequences' scores (a rated group) or None / empty (ordered by rank alone).

    `share`: an item's sequences that share a prompt of >= `min_prefix` tokens have it packed once
    (`btrm.data.prefix`); rewards stay in the same order. A row where nothing is shared is a plain row.
    """
    n = len(items)
    layout = None
    if share and items:
        input_ids, position_ids, cu, max_len, layout = shared_row(items, True, min_prefix)
        layout = layout if layout.shared else None
    if layout is None:
        input_ids, position_ids, cu, max_len = pack_sequences([s for item in items for s in item])
    counts = torch.tensor([len(item) for item in items], dtype=torch.long)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    rank = [r for k, item in enumerate(items) for r in (ranks[k] if ranks is not None else range(len(item)))]
    m = torch.tensor([0.0 if v is None else float(v) for v in (margins or [None] * n)], dtype=torch.float32)
    score = [float(v) for k, item in enumerate(items)
             for v in (scores[k] if scores is not None and scores[k] else [math.nan] * len(item))]
    return PackedBatch(input_ids, position_ids, cu, max_len, m, offsets, torch.tensor(rank, dtype=torch.long),
                       torch.tensor(score, dtype=torch.float64),
                       list(item_ids if item_ids is not None else range(n)), list(sources or ["default"] * n),
                       list(categories or [None] * n), layout)


def collate_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], **kwargs) -> PackedBatch:
    """Pairs as items of two sequences: chosen (rank 0), then rejected (rank 1). kwargs as for `collate`."""
    return collate(list(zip(chosen, rejected)), **kwargs)


def pad_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded layout packing replaces: ``[2n, L]`` right-padded ``input_ids`` and ``attention_mask``.

    Chosen rows first, then rejected (TRL's collator layout), padded to the longest of the 2n sequences. Used by
    the benchmarks' padded baselines; a reward is read at each row's last non-pad token.
    """
    seqs = [*chosen, *rejected]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def packing_efficiency(bins: list[list[int]], sizes: Sequence[int], capacity: int) -> float:
    """Real tokens / (number of non-empty bins * capacity)."""
    used = [b for b in bins if b]
    return sum(sizes[i] for b in used for i in b) / max(1, len(used) * capacity)
