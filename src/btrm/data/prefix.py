"""Shared-prefix packing: encode each prompt once.

An *item* is the sequences that answer one prompt: a preference pair, or K responses for best-of-K. Their rendered
token sequences agree up to where the responses diverge. P, that longest common prefix, is packed once, followed by
each branch Bi (the rest of sequence i). P has positions 0..p-1 and every Bi continues at p.., and

- P attends causally to P;
- Bi attends to all of P and causally to itself, never to another branch,

so each branch token sees exactly the keys, values and positions it sees in its unshared sequence: rewards and
gradients are mathematically those of the unshared row, while the projections and MLPs run once over P. P always
leaves at least one token in every branch, so a sequence's last token, where its reward is read, is never in P.

A packed row is a list of *segments* in row order. A root segment (a prompt P, or a sequence packed without
sharing) attends causally to itself; a branch segment attends to its root, then causally to itself. The
attention functions in `btrm.prefix_attention` read this layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens all `seqs` share, keeping at least one token (the reward token) in each; 0 for a single sequence."""
    if len(seqs) < 2:
        return 0
    p = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        if p <= 0:
            break
        p = min(p, common_prefix_len(seqs[0][:p], s[:p]))
    return max(p, 0)


# tokens: a shorter shared prefix stays in each sequence; saving a few tokens is not worth an extra attention
# segment per item (a judgement, not a measured break-even)
MIN_PREFIX = 16


def group_by_prefix(seqs: Sequence[Sequence[int]], capacity: int, min_prefix: int = MIN_PREFIX) -> list[list[int]]:
    """Group sequences (indices into `seqs`) into items that share a prompt, each item at most `capacity` tokens.

    For scoring, where nothing says which conversations answer the same prompt: sequences are sorted, and a run of
    neighbours becomes one item while growing it does not lower the tokens it saves, unless a sequence shares so
    much more with the next one that starting a new item saves more. Items of one sequence are packed whole.
    """
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    lcp = [common_prefix_len(seqs[a], seqs[b]) for a, b in zip(order[:-1], order[1:])]
    groups: list[list[int]] = []
    p = 0
    for k, i in enumerate(order):
        if k:
            q = min(p, lcp[k - 1], len(seqs[i]) - 1)
            n = len(groups[-1])
            # this sequence shares much more with the next one: starting an item with it saves more than joining
            closer_to_next = k < len(lcp) and lcp[k] - q > n * q
            if q >= min_prefix and n * q >= (n - 1) * p and not closer_to_next:
                groups[-1].append(i)
                p = q
                continue
        groups.append([i])
        p = len(seqs[i]) - 1
    items = []
    for g in groups:  # split items over the capacity; each part repeats the prompt
        p = item_prefix([seqs[i] for i in g], min_prefix)
        part, used = [], p
        for i in g:
            if part and used + len(seqs[i]) - p > capacity:
                items.append(part)
                part, used = [], p
            part.append(i)
            used += len(seqs[i]) - p
        items.append(part)
    return items


def item_prefix(seqs: Sequence[Sequence[int]], min_prefix: int = MIN_PREFIX) -> int:
    """P's length for an item as packed: its shared prefix, or 0 (packed whole) when shorter than `min_prefix`."""
    p = shared_prefix_len(seqs)
    return p if p >= min_prefix else 0


def item_tokens(lengths: Sequence[int], prefix: int) -> int:
    """Tokens an item occupies in a packed row: P once, then each branch."""
    return prefix + sum(n - prefix for n in lengths)


class VarlenIndex(NamedTuple):
    """Gather indices and cumulative lengths for two varlen calls over a row (built once per row and device).

    roots: queries = keys = the root segments' tokens.
    branches: queries = branch tokens; keys/values = [root; branch] gathered per branch, so a causal kernel that
    aligns the mask bottom-right (flash's rule when queries are fewer than keys) gives the shared-prefix mask.
    `inverse` puts cat(root output, branch output) back into row order.
    """

    root: torch.Tensor
    cu_root: torch.Tensor
    max_root: int
    branch: torch.Tensor | None
    cu_branch_q: torch.Tensor | None
    branch_kv: torch.Tensor | None
    cu_branch_k: torch.Tensor | None
    max_branch_q: int
    max_branch_k: int
    inverse: torch.Tensor | None


@dataclass
class PrefixLayout:
    """Segments of one packed row and where each sequence's reward is read."""

    lengths: list[int]  # tokens per segment, in row order
    parent: list[int]  # per segment: index of the root segment a branch attends to, -1 for a root
    ends: list[int]  # per sequence (in input order): row index of its last token
    sequence_tokens: int  # tokens of the sequences themselves (what the row takes packed without sharing)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def shared(self) -> bool:
        return any(p >= 0 for p in self.parent)

    def starts(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(int).tolist()

    def varlen_index(self, device) -> VarlenIndex:
        key = ("varlen", str(device))
        if key not in self._cache:
            self._cache[key] = self._varlen_index(torch.device(device))
        return self._cache[key]

    def _varlen_index(self, device) -> VarlenIndex:
        starts = self.starts()
        span = [np.arange(a, a + n) for a, n in zip(starts, self.lengths)]
        roots = [s for s, p in enumerate(self.parent) if p < 0]
        branches = [s for s, p in enumerate(self.parent) if p >= 0]

        def cu(sizes):
            return torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32, device=device)

        def idx(parts):
            return torch.tensor(np.concatenate(parts), dtype=torch.long, device=device)

        root = [span[s] for s in roots]
        if not branches:
            return VarlenIndex(idx(root), cu([self.lengths[s] for s in roots]), max(self.lengths), None, None, None,
                               None, 0, 0, None)
        branch = [span[s] for s in branches]
        kv = [np.concatenate([span[self.parent[s]], span[s]]) for s in branches]
        order = np.concatenate(root + branch)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return VarlenIndex(
            idx(root), cu([self.lengths[s] for s in roots]), max(self.lengths[s] for s in roots),
            idx(branch), cu([self.lengths[s] for s in branches]), idx(kv), cu([len(k) for k in kv]),
            max(self.lengths[s] for s in branches), max(len(k) for k in kv),
            torch.tensor(inverse, dtype=torch.long, device=device))

    def dense_mask(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Additive [1, 1, T, T] mask (0 where a query may attend, dtype's min elsewhere): the sdpa/eager reference."""
        seg = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        parent = torch.tensor(self.parent)[seg]
        t = torch.arange(seg.numel())
        allowed = ((seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])) | (parent[:, None] == seg[None, :])
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(device)


def shared_row(items: Sequence[Sequence[Sequence[int]]], share: bool = True, min_prefix: int = MIN_PREFIX):
    """One row of items, each item's shared prompt once: (input_ids [1, T], position_ids [1, T], segment bounds
    cu [n_seg + 1] int32, longest segment, PrefixLayout). Items whose prompt is shorter than `min_prefix` (or that
    have one sequence) are packed whole, so plain pairs and shared items mix in one row; `share=False` packs
    every sequence whole."""
    ids, pos, lengths, parent, ends = [], [], [], [], []
    offset = unshared = 0
    for seqs in items:
        if any(len(s) == 0 for s in seqs):
            raise ValueError("cannot pack an empty sequence")
        unshared += sum(len(s) for s in seqs)
        p = item_prefix(seqs, min_prefix) if share else 0
        if p:
            root = len(lengths)
            ids.append(np.asarray(seqs[0][:p]))
            pos.append(np.arange(p))
            lengths.append(p)
            parent.append(-1)
            offset += p
        for s in seqs:
            n = len(s) - p
            ids.append(np.asarray(s[p:]))
            pos.append(np.arange(p, len(s)))
            lengths.append(n)
            parent.append(root if p else -1)
            offset += n
            ends.append(offset - 1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(np.cumsum(lengths), dtype=torch.int32)
    return (torch.tensor(np.concatenate(ids).astype(np.int64))[None],
            torch.tensor(np.concatenate(pos).astype(np.int64))[None], cu, max(lengths),
            PrefixLayout(lengths, parent, ends, unshared))
