"""Tokenized pairs and their disk cache (built by btrm.data.pipeline), the over-long policy, the held-out split,
and the deterministic step sampler that makes resume exact."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btrm.config import DataConfig, SourceConfig
from btrm.data.packing import collate, plan_step
from btrm.data.prefix import MIN_PREFIX, common_prefix_len
from btrm.data.sources import source_files

log = logging.getLogger(__name__)

CACHE_VERSION = 6  # bump when tokenization or the cache layout changes (2: pairs rendering to the same ids dropped;
# 3: written by btrm.data.pipeline: int32 ids, .npy token counts; 4: prefix_len, the prompt a pair shares;
# 5: ranked groups: more_ids, scores, seq_lens; 6: each split one Arrow file, <split>/data.arrow, written a record batch at a time)


# ----------------------------------------------------------------------------------------------------------------------
# Over-long policy


def cut_prompt_left(seqs: list[list[int]], prompt_len: int, need: int, bos_id: int | None) -> list[list[int]]:
    """Drop `need` tokens from the left of each sequence, after a leading BOS, out of its first `prompt_len` tokens
    (a prompt all of them share). The rest, and so every reward token, stays whole; ValueError when the prompt
    (less the BOS) is shorter than `need`. Training (`fit_pair`) and scoring (`RewardModel`) both cut here."""
    head = 1 if bos_id is not None and seqs[0][:1] == [bos_id] else 0
    if prompt_len - head < need:
        raise ValueError(f"the last turn alone needs {len(seqs[0]) - prompt_len + head} tokens")
    return [s[:head] + s[head + need:] for s in seqs]


def fit_pair(c: list[int], r: list[int], max_length: int, max_tokens: int, policy: str, bos_id: int | None):
    """(chosen, rejected, status) with status ok | truncated | dropped. Only shared prompt tokens are ever cut,
    from the left (after a leading BOS); the responses, and so the reward tokens, stay whole."""
    seqs, status = fit_seqs([c, r], max_length, max_tokens, policy, bos_id)
    return (seqs[0], seqs[1], status) if seqs else (None, None, status)


def fit_seqs(seqs: list[list[int]], max_length: int, max_tokens: int, policy: str, bos_id: int | None):
    """(sequences, status) of one item under the over-long policy: every sequence <= max_length and all of them
    <= max_tokens together (unshared, so the item fits with or without data.share_prompt). Status ok | truncated |
    dropped (sequences None); the prompt they all share is cut from the left (`truncate_prompt_left`)."""
    if max(map(len, seqs)) <= max_length and sum(map(len, seqs)) <= max_tokens:
        return seqs, "ok"
    if policy == "drop":
        return None, "dropped"
    shared = min(common_prefix_len(seqs[0], s) for s in seqs[1:]) - 1  # keep >= 1 shared token before the branches
    need = max(max(map(len, seqs)) - max_length, math.ceil((sum(map(len, seqs)) - max_tokens) / len(seqs)), 0)
    try:
        seqs = cut_prompt_left(seqs, shared, need, bos_id)
    except ValueError:
        return None, "dropped"
    return seqs, "truncated"


def fit_group(seqs: list[list[int]], scores: list[float] | None, max_length: int, max_tokens: int, policy: str,
              bos_id: int | None):
    """(kept response indices, sequences, status) of a group (best first). While it is over-long and has more than
    two responses, its longest response is dropped (status `trimmed`, unless still dropped or truncated); what is
    left then follows the policy like a pair (`fit_seqs`). Responses left all tied: dropped."""
    keep = list(range(len(seqs)))
    over = lambda ks: (max(len(seqs[k]) for k in ks) > max_length  # noqa: E731
                       or sum(len(seqs[k]) for k in ks) > max_tokens)
    while len(keep) > 2 and over(keep):
        keep.remove(max(keep, key=lambda k: (len(seqs[k]), k)))
    if scores is not None and len({scores[k] for k in keep}) == 1:
        return None, None, "dropped"
    fitted, status = fit_seqs([seqs[k] for k in keep], max_length, max_tokens, policy, bos_id)
    if fitted is None:
        return None, None, status
    return keep, fitted, "trimmed" if status == "ok" and len(keep) < len(seqs) else status


def pair_hash(*convs: list[dict]) -> str:
    """Stable content hash of an item's conversations, independent of their order (a swapped pair lands on the
    same side of the split as the original)."""
    parts = sorted(json.dumps(x, sort_keys=True, ensure_ascii=False) for x in convs)
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


def is_heldout(h: str, fraction: float) -> bool:
    return int(h[:15], 16) / 16**15 < fraction


# ----------------------------------------------------------------------------------------------------------------------
# Tokenized pair store


@dataclass
class TokenizedPairs:
    """Column store of tokenized items (an Arrow-backed `datasets.Dataset`): pairs, and ranked groups of K
    responses. An item's sequences are stored best first: `chosen_ids` (the best), `rejected_ids` (the next),
    `more_ids` (the rest of a group), with `scores` for a rated group (empty otherwise) and `seq_lens`.

    The trainer reads an item store only through `len`, `sizes`, `seq_lengths` and `batch`.
    """

    ds: Any

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per item (all its sequences): what packing budgets."""
        if not hasattr(self, "_sizes"):
            self._sizes = np.asarray(self.ds["num_tokens"], dtype=np.int64)
        return self._sizes

    @property
    def chosen_lengths(self) -> np.ndarray:
        if not hasattr(self, "_chosen_len"):
            self._chosen_len = np.asarray(self.ds["chosen_len"], dtype=np.int64)
        return self._chosen_len

    @property
    def prefix_lengths(self) -> np.ndarray:
        """Tokens all of an item's sequences share from the start (at least one left in each)."""
        if not hasattr(self, "_prefix_len"):
            self._prefix_len = np.asarray(self.ds["prefix_len"], dtype=np.int64)
        return self._prefix_len

    def packed_sizes(self, share: bool) -> np.ndarray:
        """Tokens each item takes in a packed row: its sequences, less (n - 1) prompts when the prompt is packed
        once (n = 2 for a pair)."""
        if not share:
            return self.sizes
        p = self.prefix_lengths
        return self.sizes - np.where(p >= MIN_PREFIX, p, 0) * (self.num_seqs - 1)

    @property
    def num_seqs(self) -> np.ndarray:
        """Sequences per item (2 for a pair)."""
        if not hasattr(self, "_num_seqs"):
            import pyarrow.compute as pc

            self._num_seqs = pc.list_value_length(self.ds.data.column("seq_lens")).to_numpy().astype(np.int64)
        return self._num_seqs

    def seq_lengths(self, indices: list[int]) -> list[int]:
        """Token counts of these items' sequences in layout order (best first), flattened."""
        if not indices:
            return []
        return [n for lens in self.ds.select_columns(["seq_lens"])[list(indices)]["seq_lens"] for n in lens]

    def batch(self, indices: list[int], share: bool = False):
        """PackedBatch of these items, in this order; with `share`, each item's prompt packed once."""
        rows = self.ds[indices] if indices else {k: [] for k in self.ds.column_names}
        items = [[c, r, *more] for c, r, more in zip(rows["chosen_ids"], rows["rejected_ids"], rows["more_ids"])]
        return collate(items, scores=rows["scores"], item_ids=list(indices), share=share, margins=rows["margin"],
                       sources=rows["source"], categories=rows["category"])


# ----------------------------------------------------------------------------------------------------------------------
# Cache


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha1()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(str(tokenizer.bos_token).encode())
    return h.hexdigest()


def _files_fingerprint(sources: list[SourceConfig]) -> list:
    out = []
    for s in sources:
        files = source_files(s)
        out.append([asdict(s), [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    return out


def cache_key(cfg: DataConfig, tokenizer, seed: int) -> str:
    payload = {
        "v": CACHE_VERSION, "tok": _tokenizer_fingerprint(tokenizer), "kw": cfg.chat_template_kwargs,
        "train": _files_fingerprint(cfg.sources), "eval": _files_fingerprint(cfg.eval_sources),
        "fraction": cfg.eval_fraction, "max_length": cfg.max_length, "max_tokens": cfg.max_tokens,
        "overlong": cfg.overlong, "seed": seed,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    train: TokenizedPairs
    eval: TokenizedPairs | None
    report: dict  # {"train": DataReport.as_dict(), "eval": ..., "train_pairs": n, "eval_pairs": n}


def cache_root(cfg: DataConfig, tokenizer, seed: int) -> Path:
    return Path(cfg.cache_dir) / cache_key(cfg, tokenizer, seed)


def prepare_data(cfg: DataConfig, tokenizer, seed: int = 0, use_cache: bool = True) -> PreparedData:
    """Validated, split, tokenized pairs (btrm.data.pipeline streams them to disk); the cache is reused when the key
    matches and memory-mapped. Without the cache, the pairs are built in a temporary directory and read into memory."""
    from btrm.data import pipeline

    if use_cache:
        root = cache_root(cfg, tokenizer, seed)
        pipeline.prepare_cache(cfg, tokenizer, seed, root)
        return pipeline.load_prepared(root)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        out.mkdir()
        pipeline.build_cache(cfg, tokenizer, seed, out)
        return pipeline.load_prepared(out, in_memory=True)


# ----------------------------------------------------------------------------------------------------------------------
# Deterministic step sampler: global step -> the step's pairs -> this rank's micro-batches


@dataclass
class StepSampler:
    num_pairs: int
    global_batch_pairs: int
    seed: int
    shuffle: bool = True

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_pairs / self.global_batch_pairs))

    def step_pairs(self, step: int) -> list[int]:
        """Pair indices of global step `step` (0-based). A function of (seed, step) only: resume is exact."""
        epoch, s = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch (8 bytes a pair), not one per step
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs) if self.shuffle
                           else np.arange(self.num_pairs))
            self._epoch = epoch
        return self._order[s * self.global_batch_pairs:(s + 1) * self.global_batch_pairs].tolist()


def rank_micro_batches(data: TokenizedPairs, pair_indices: list[int], max_tokens: int, world_size: int, rank: int,
                       share: bool = False):
    """This rank's packed micro-batches for one step (every rank computes the same plan); `sizes` are the tokens
    each pair takes in its row (its prompt counted once under `share`)."""
    sizes = data.packed_sizes(share)[pair_indices].tolist()
    plan = plan_step(sizes, max_tokens, world_size)
    return [data.batch([pair_indices[i] for i in mb], share) for mb in plan[rank]], plan, sizes
