"""Streaming data preparation: source files -> validate -> render -> tokenize -> split / weight -> on-disk cache.

Every stage is an Arrow file on disk, and the sources go through stages 1-2 in segments of about SEGMENT_BYTES, so
the memory a process holds, memory-mapped pages of those files included, stays bounded whatever the number of pairs:
  1. read     raw rows of every source are streamed (pickled as read; jsonl lines unparsed) into one Arrow file per
              segment;
  2. convert  one batched `map` per segment (`num_proc` processes) validates, renders and tokenizes each row once,
              applies the over-long policy and decides the held-out split by content hash; skipped rows stay as rows
              with their reason. The segment's raw file is deleted and its maps closed before the next is read;
  3. order    one pass of plain reads (no memory map) over the converted segments copies their small columns
              into NumPy arrays (22 bytes per pair) and counts rows read, kept and skipped per source (so
              counts merge across processes by construction); source weights (repeat / subsample) and the held-out
              split are index arithmetic on those arrays, never a Python list of pairs;
  4. write    the ordered rows are copied to `<split>/data.arrow` one source record batch at a time (a plain read at
              the batch's offset), plus `<split>_sizes.npy`, `<split>_chosen_len.npy` and `<split>_prefix_len.npy`
              (tokens per pair, of its chosen side, shared by both) that training memory-maps for the step sampler
              and the packing plans.
The result (ids, order, report) equals the list-based `prepare_data` on the same data; tests/core/test_pipeline.py
checks it. The cache directory is written under a file lock into `<key>.tmp` and renamed when complete, so two
preparers never race and a run killed mid-way leaves nothing that a later run would trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from btrm.config import DataConfig, SourceConfig
from btrm.data.dataset import PreparedData, TokenizedPairs, cache_root, fit_group, is_heldout, pair_hash
from btrm.data.sources import (BadRow, DataReport, check_columns, iter_raw_rows, normalize_row, parse_row,
                               source_files, source_name)
from btrm.data.pairs import Group
from btrm.errors import UserError
from btrm.data.prefix import shared_prefix_len
from btrm.render import render_many

log = logging.getLogger(__name__)

STATUS_SKIP = "skip"  # a row that failed validation (status column; ok | truncated | dropped | identical otherwise)
IDENTICAL = "identical"  # responses that render to the same token ids: skipped as identical_responses


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: raw rows -> Arrow (lazily, one row at a time)


def _raw_rows(shards: list[tuple[int, SourceConfig]]) -> Iterator[dict]:
    # (index, source) pairs: datasets may split a list argument of the generator into shards
    for k, src in shards:
        for origin, row in iter_raw_rows(src, parse=False):  # jsonl lines are parsed in the workers
            yield {"src": k, "origin": origin, "raw": pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: validate -> render -> tokenize -> over-long policy (batched, in num_proc processes)


def _convert_batch(batch, sources, names, tokenizer, kwargs, max_length, max_tokens, policy, eval_fraction):
    n = len(batch["src"])
    out = {"margin": [None] * n, "source": [None] * n, "category": [None] * n, "chosen_ids": [[]] * n,
           "rejected_ids": [[]] * n, "more_ids": [[]] * n, "scores": [[]] * n, "seq_lens": [[]] * n,
           "status": [STATUS_SKIP] * n, "num_tokens": [0] * n, "chosen_len": [0] * n,
           "prefix_len": [0] * n, "heldout": [False] * n, "skip_reason": [None] * n, "skip_field": [None] * n,
           "skip_detail": [None] * n}
    keep, items = [], []
    for i, (k, origin, raw) in enumerate(zip(batch["src"], batch["origin"], batch["raw"])):
        try:
            item = normalize_row(parse_row(origin, pickle.loads(raw)), sources[k], origin, names[k])
        except BadRow as err:
            out["skip_reason"][i], out["skip_field"][i], out["skip_detail"][i] = err.reason, err.field, err.detail
            continue
        keep.append(i)
        items.append(item)
        out["margin"][i], out["source"][i], out["category"][i] = item.margin, item.source, item.category
        if eval_fraction > 0:
            out["heldout"][i] = is_heldout(pair_hash(*_convs(item)), eval_fraction)
    convs = [_convs(item) for item in items]  # a pair is a group of 2: [chosen, rejected]
    flat = render_many(tokenizer, [c for cs in convs for c in cs], kwargs)
    bos = tokenizer.bos_token_id if tokenizer.bos_token else None
    start = 0
    for i, item, cs in zip(keep, items, convs):
        ids, start = flat[start:start + len(cs)], start + len(cs)
        scores = getattr(item, "scores", None)
        # the raw texts differ (normalize_row checked), but the template may trim the difference away
        if len({tuple(x) for x in ids}) < len(ids):
            kept, ids, status = None, None, IDENTICAL
        else:  # a pair fits as it always did (`fit_pair`); a group may first drop responses
            kept, ids, status = fit_group(ids, scores, max_length, max_tokens, policy, bos)
        out["status"][i] = status
        if ids is None:
            continue
        out["chosen_ids"][i], out["rejected_ids"][i], out["more_ids"][i] = ids[0], ids[1], ids[2:]
        out["scores"][i] = [scores[k] for k in kept] if scores is not None else []
        out["seq_lens"][i] = [len(x) for x in ids]
        out["num_tokens"][i], out["chosen_len"][i] = sum(map(len, ids)), len(ids[0])
        out["prefix_len"][i] = shared_prefix_len(ids)  # the prompt packed once under share_prompt
    return out


def _convs(item) -> list:
    return item.responses if isinstance(item, Group) else [item.chosen, item.rejected]


def _features():
    from datasets import Features, List, Value

    return Features({"src": Value("int32"), "origin": Value("string"), "margin": Value("float64"),
                     "source": Value("string"), "category": Value("string"), "chosen_ids": List(Value("int32")),
                     "rejected_ids": List(Value("int32")), "more_ids": List(List(Value("int32"))),
                     "scores": List(Value("float64")), "seq_lens": List(Value("int32")), "status": Value("string"),
                     "num_tokens": Value("int64"), "chosen_len": Value("int64"), "prefix_len": Value("int64"),
                     "heldout": Value("bool"), "skip_reason": Value("string"),
                     "skip_field": Value("string"), "skip_detail": Value("string")})


SEGMENT_BYTES = 256 * 2**20  # raw (pickled) rows per segment: bounds the memory-mapped pages a process touches


def _raw_segments(sources: list[SourceConfig], work: Path) -> Iterator[Path]:
    """The raw rows of every source as Arrow files of about SEGMENT_BYTES each, written one at a time (the caller
    converts and deletes each before the next is read)."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"src": Value("int32"), "origin": Value("string"), "raw": Value("binary")})
    rows = _raw_rows(list(enumerate(sources)))
    work.mkdir(parents=True, exist_ok=True)
    for seg in itertools.count():
        row = next(rows, None)
        if row is None:
            return
        path = work / f"{seg:05d}.arrow"
        writer = ArrowWriter(features=features, path=str(path))
        size = 0
        while row is not None:
            writer.write(row)
            size += len(row["raw"])
            row = next(rows, None) if size < SEGMENT_BYTES else None
        writer.finalize()
        yield path


def convert_sources(sources: list[SourceConfig], tokenizer, cfg: DataConfig, work: Path, eval_fraction: float,
                    num_proc: int) -> tuple[list[str], int]:
    """One Arrow row per raw row of every source, validated and tokenized (stages 1 and 2), segment by segment: each
    segment is read, converted by its own `map` and released (its raw file deleted, its memory maps closed) before
    the next, so no process maps more than one segment whatever the number of pairs. Returns the converted Arrow
    files in row order, and their number of rows; later stages read them with plain reads, never through a memory
    map."""
    import gc

    from datasets import Dataset

    names = [source_name(s) for s in sources]
    files, rows = [], 0
    for i, path in enumerate(_raw_segments(sources, work / "read")):
        raw = Dataset.from_file(str(path))
        nproc = num_proc if num_proc > 1 and len(raw) >= 1000 else None
        done = raw.map(_convert_batch, batched=True, batch_size=256, num_proc=nproc, remove_columns=["raw"],
                       features=_features(), desc=f"validating and tokenizing pairs (segment {i + 1})",
                       load_from_cache_file=False, cache_file_name=str(work / "convert" / f"{i:05d}.arrow"),
                       fn_kwargs=dict(sources=sources, names=names, tokenizer=tokenizer,
                                      kwargs=cfg.chat_template_kwargs, max_length=cfg.max_length,
                                      max_tokens=cfg.max_tokens, policy=cfg.overlong, eval_fraction=eval_fraction))
        files += [f["filename"] for f in done.cache_files]
        rows += len(done)
        del raw, done
        gc.collect()  # unmap the segment's files now
        path.unlink()
    return files, rows


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: one streamed scan of the converted rows; reports, weights and the held-out split by index arithmetic


@dataclasses.dataclass
class Scan:
    """The converted rows' small columns as NumPy arrays (22 bytes per row) and where each record batch lies in the
    files. Built by one pass of plain reads: a batch's buffers are freed once its columns are copied out, so neither
    the heap nor memory-mapped pages grow with the token ids read."""

    files: list[str]
    schema: object  # the files' pyarrow schema
    where: np.ndarray  # int64 (batches, 2): the file and byte offset of each record batch, in row order
    starts: np.ndarray  # first row of each batch, and the number of rows last
    src: np.ndarray  # int32: the source's index in the config
    status: np.ndarray  # int8 code into STATUS_CODES
    heldout: np.ndarray  # bool
    source: np.ndarray  # int32 code into source_labels (the pair's own source name), -1 for a skipped row
    source_labels: list[str]
    num_tokens: np.ndarray  # int32 per row, likewise chosen_len and prefix_len
    chosen_len: np.ndarray
    prefix_len: np.ndarray
    identical_origin: dict[int, str]  # row -> origin of rows whose responses render to the same ids (rare)


STATUS_CODES = ["ok", "truncated", "trimmed", "dropped", IDENTICAL, STATUS_SKIP]


def scan_rows(files: list[str], n: int, sources: list[SourceConfig], report: DataReport, strict: bool) -> Scan:
    """Read the `n` converted rows once, in order: the small columns into a Scan, and into `report` the rows read,
    kept and skipped per source (skip reasons and their first example in row order, so counts from several
    tokenizing processes merge by construction).

    The arrays are allocated once, for `n` rows, and filled batch by batch through Arrow compute, with no Python
    object per row: per-batch arrays and per-row strings, freed in between, fragmented the heap to 3-5 times the
    arrays' own 22 bytes per pair."""
    import array

    import pyarrow as pa
    import pyarrow.compute as pc

    names = [source_name(s) for s in sources]
    arrays = {"src": np.empty(n, np.int32), "status": np.empty(n, np.int8), "heldout": np.empty(n, bool),
              "source": np.empty(n, np.int32), "num_tokens": np.empty(n, np.int32),
              "chosen_len": np.empty(n, np.int32), "prefix_len": np.empty(n, np.int32)}
    where_file, where_at, starts = array.array("q"), array.array("q"), array.array("q", [0])
    labels, identical, schema = {}, {}, None
    status_set, skip, same = pa.array(STATUS_CODES), STATUS_CODES.index(STATUS_SKIP), STATUS_CODES.index(IDENTICAL)
    for k, file in enumerate(files):
        with pa.OSFile(file) as f:
            messages = pa.ipc.MessageReader.open_stream(f)
            schema = pa.ipc.read_schema(messages.read_next_message())
            while True:
                at = f.tell()
                try:
                    batch = pa.ipc.read_record_batch(messages.read_next_message(), schema)
                except StopIteration:
                    break
                lo, hi = starts[-1], starts[-1] + batch.num_rows
                if hi > n:
                    raise RuntimeError(f"{file} holds more rows than the {n} converted")
                where_file.append(k)
                where_at.append(at)
                starts.append(hi)
                codes = pc.index_in(batch.column("status"), value_set=status_set)
                if codes.null_count:
                    raise RuntimeError(f"{file}: a status outside {STATUS_CODES}")
                status = arrays["status"][lo:hi]
                status[:] = codes.to_numpy()
                for name in ("src", "num_tokens", "chosen_len", "prefix_len"):
                    arrays[name][lo:hi] = batch.column(name).to_numpy()
                arrays["heldout"][lo:hi] = batch.column("heldout").to_numpy(zero_copy_only=False)
                enc = pc.dictionary_encode(batch.column("source"))
                lut = np.asarray([labels.setdefault(x, len(labels)) for x in enc.dictionary.to_pylist()] + [-1],
                                 dtype=np.int32)
                arrays["source"][lo:hi] = lut[pc.fill_null(enc.indices, len(lut) - 1).to_numpy()]
                for i in np.flatnonzero(status == skip).tolist():  # in row order: the first example of a reason
                    err = BadRow(*(batch.column(c)[i].as_py() for c in ("skip_reason", "skip_field", "skip_detail",
                                                                         "origin")))
                    if strict:
                        raise err
                    report.skip(names[batch.column("src")[i].as_py()], err)
                for i in np.flatnonzero(status == same).tolist():
                    identical[lo + i] = batch.column("origin")[i].as_py()
                del batch
    if starts[-1] != n:
        raise RuntimeError(f"the converted files hold {starts[-1]} rows, not {n}")
    read = np.bincount(arrays["src"], minlength=len(sources))
    kept = np.bincount(arrays["src"][arrays["status"] != skip], minlength=len(sources))
    for k in range(len(sources)):
        if read[k]:
            report.read[names[k]] += int(read[k])
        if kept[k]:
            report.kept[names[k]] += int(kept[k])
    where = np.stack([np.asarray(where_file, dtype=np.int64), np.asarray(where_at, dtype=np.int64)], axis=1)
    return Scan(files, schema, where, np.asarray(starts, dtype=np.int64),
                source_labels=list(labels), identical_origin=identical, **arrays)


def _is(scan: Scan, status: str) -> np.ndarray:
    return scan.status == STATUS_CODES.index(status)


def _first_order_counts(codes: np.ndarray, labels: list[str]) -> dict[str, int]:
    """{label: count} in order of first appearance (the order a Counter filled row by row would have)."""
    if len(codes) == 0:
        return {}
    uniq, first = np.unique(codes, return_index=True)
    counts = np.bincount(codes, minlength=len(labels))
    return {labels[u]: int(counts[u]) for u in uniq[np.argsort(first)]}


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """sorted(random.Random(seed).sample(range(n), k)) as an int64 array, in O(n) bytes rather than Python objects.

    Same draws as CPython's `random.sample` (3.11), which `sources.weighted_indices` uses: the pool variant for small
    populations, the rejection variant (a bitmap here instead of a set) otherwise."""
    rnd = random.Random(seed)
    randbelow = rnd._randbelow
    result = np.empty(k, dtype=np.int64)
    setsize = 21
    if k > 5:
        setsize += 4 ** math.ceil(math.log(k * 3, 4))
    if n <= setsize:
        pool = np.arange(n, dtype=np.int64)
        for i in range(k):
            j = randbelow(n - i)
            result[i] = pool[j]
            pool[j] = pool[n - i - 1]
    else:
        selected = np.zeros(n, dtype=bool)
        for i in range(k):
            j = randbelow(n)
            while selected[j]:
                j = randbelow(n)
            selected[j] = True
            result[i] = j
    result.sort()
    return result


def weighted_order(scan: Scan, sources: list[SourceConfig], seed: int) -> np.ndarray:
    """Row indices of every kept pair, source by source, repeated / subsampled by the source weight (the order the
    list-based loader produced)."""
    kept = ~_is(scan, STATUS_SKIP)
    parts = []
    for k, s in enumerate(sources):
        rows = np.flatnonzero(kept & (scan.src == k))
        if s.weight != 1.0:
            whole, frac = int(s.weight), s.weight - int(s.weight)
            idx = np.tile(np.arange(len(rows), dtype=np.int64), whole)
            extra = round(frac * len(rows))
            if extra:
                idx = np.concatenate([idx, sample_indices(len(rows), extra, seed + k)])
            rows = rows[idx]
        parts.append(rows)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenized_report(scan: Scan, order: np.ndarray, report: DataReport, strict: bool) -> np.ndarray:
    """Count over-long handling, and pairs whose responses render to the same ids, per pair source over `order`
    (a repeated pair counts again, as in the list it stands for); return the rows kept."""
    for status, counter in (("dropped", report.overlong_dropped), ("truncated", report.overlong_truncated),
                            ("trimmed", report.overlong_trimmed)):
        sel = _is(scan, status)[order]
        for name, n in _first_order_counts(scan.source[order[sel]], scan.source_labels).items():
            counter[name] += n
    identical = _is(scan, IDENTICAL)[order]
    for row in order[identical].tolist():  # rare: row by row, in order, for the reasons' first example
        src = scan.source_labels[scan.source[row]]
        err = BadRow("identical_responses", "rejected", "the same tokens as chosen once rendered",
                     scan.identical_origin[row])
        if strict:
            raise err
        report.skip(src, err)
        report.kept[src] -= 1
    return order[~(_is(scan, "dropped") | _is(scan, IDENTICAL))[order]]


# ----------------------------------------------------------------------------------------------------------------------
# Stage 4: the cache directory


FINAL_COLUMNS = ["margin", "source", "category", "origin", "chosen_ids", "rejected_ids", "more_ids", "scores",
                 "seq_lens", "status", "num_tokens", "chosen_len", "prefix_len"]


def write_split(scan: Scan, rows: np.ndarray, path: Path) -> int:
    """The split's rows, in order, as `<path>/data.arrow`, plus its per-pair token counts as .npy files that
    training memory-maps: `<split>_sizes.npy` (chosen + rejected), `<split>_chosen_len.npy` and
    `<split>_prefix_len.npy` (the tokens both share), int32.

    Rows are copied one source record batch at a time: each run of rows from the same batch is read (a plain read
    at the batch's offset), taken and written before the next, so memory holds one batch whatever the split's size.
    Weights and the held-out split make `rows` a few ascending runs, so each batch is read about once per run."""
    import pyarrow as pa
    from datasets import Features
    from datasets.arrow_writer import ArrowWriter

    path.mkdir(parents=True)
    features = _features()
    writer = ArrowWriter(features=Features({k: features[k] for k in FINAL_COLUMNS}), path=str(path / "data.arrow"))
    handles: dict[int, object] = {}
    try:
        batch_of = np.searchsorted(scan.starts, rows, side="right") - 1
        cuts = (np.flatnonzero(np.diff(batch_of)) + 1).tolist()
        for a, b in zip([0] + cuts, cuts + [len(rows)]) if len(rows) else ():  # every held-out pair may be dropped
            k, at = scan.where[batch_of[a]].tolist()
            if k not in handles:
                handles[k] = pa.OSFile(scan.files[k])
            handles[k].seek(at)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(handles[k]), scan.schema)
            local = pa.array(rows[a:b] - scan.starts[batch_of[a]])
            writer.write_table(pa.Table.from_batches([batch.select(FINAL_COLUMNS).take(local)]))
        writer.finalize()
    finally:
        for f in handles.values():
            f.close()
    for name, values in (("sizes", scan.num_tokens), ("chosen_len", scan.chosen_len),
                         ("prefix_len", scan.prefix_len)):
        np.save(path.with_name(f"{path.name}_{name}.npy"), values[rows])
    return len(rows)


def build_cache(cfg: DataConfig, tokenizer, seed: int, out: Path, num_proc: int | None = None) -> dict:
    """Prepare train (and eval) pairs into the empty directory `out`; returns the report."""
    num_proc = cfg.num_proc if num_proc is None else num_proc
    work = out / "work"
    for src in cfg.sources + cfg.eval_sources:
        check_columns(src)  # a parquet / arrow file without the pair columns is one error, not every row skipped
    train_report, eval_report = DataReport(), DataReport()
    split_by_hash = not cfg.eval_sources and cfg.eval_fraction > 0
    train_files, n = convert_sources(cfg.sources, tokenizer, cfg, work / "train",
                                     cfg.eval_fraction if split_by_hash else 0, num_proc)
    train = scan_rows(train_files, n, cfg.sources, train_report, cfg.strict)
    held_out = None
    if cfg.eval_sources:
        eval_files, n = convert_sources(cfg.eval_sources, tokenizer, cfg, work / "eval", 0, num_proc)
        held_out = scan_rows(eval_files, n, cfg.eval_sources, eval_report, cfg.strict)
        eval_order = weighted_order(held_out, cfg.eval_sources, seed)
    order = weighted_order(train, cfg.sources, seed)
    if split_by_hash:
        held = train.heldout[order]
        order, eval_order, held_out = order[~held], order[held], train
    if len(order) == 0:
        files = [str(f) for src in cfg.sources for f in source_files(src)] or [src.path for src in cfg.sources]
        raise UserError(f"no valid training pairs in {', '.join(files)}: "
                        + (train_report.summary().replace("\n", "; ") or "no rows"))
    train_rows = tokenized_report(train, order, train_report, cfg.strict)
    eval_rows = (tokenized_report(held_out, eval_order, eval_report, cfg.strict)
                 if held_out is not None and len(eval_order) else None)
    report = {"train": train_report.as_dict(), "eval": eval_report.as_dict(),
              "train_pairs": len(train_rows), "eval_pairs": len(eval_rows) if eval_rows is not None else 0}
    if len(train_rows) == 0:
        raise UserError(f"every training pair was dropped as over-long (max_length={cfg.max_length}, "
                         f"max_tokens={cfg.max_tokens}); raise them or use data.overlong=truncate_prompt_left")
    del order
    write_split(train, train_rows, out / "train")
    if eval_rows is not None:
        write_split(held_out, eval_rows, out / "eval")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work)
    return report


@contextlib.contextmanager
def file_lock(path: Path, log_every_s: float = 60.0):
    """Exclusive advisory lock on `path` (the kernel releases it if the holder dies); logs while it waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        t0, next_log = time.monotonic(), 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= next_log:
                    log.info("waiting for %s: another process is preparing this data (%.0f s so far)", path,
                             time.monotonic() - t0)
                    next_log += log_every_s
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_cache(cfg: DataConfig, tokenizer, seed: int, root: Path, num_proc: int | None = None) -> bool:
    """Make `root` a complete cache unless it is one already; True if this call built it.

    Holds `<root>.lock` while building into `<root>.tmp`, so concurrent preparers (ranks, nodes sharing a file
    system, a `btrm data prepare` next to a training run) build once. A build that fails removes its `.tmp`; one
    left by a killed run is removed by the next."""
    if (root / "done.json").exists():
        return _reused(cfg, root)
    with file_lock(root.with_name(root.name + ".lock")):
        if (root / "done.json").exists():  # another process finished while we waited
            return _reused(cfg, root)
        tmp = root.with_name(root.name + ".tmp")
        if tmp.exists():
            log.info("removing %s left by an interrupted run", tmp)
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            build_cache(cfg, tokenizer, seed, tmp, num_proc)
        except BaseException:  # a bad row, no valid pair, Ctrl-C: no half-built cache (and its work files) left
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "done.json").write_text("{}")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    return True


def _reused(cfg: DataConfig, root: Path) -> bool:
    """False, for a complete cache that this config may use. `strict` is not part of the cache key (it changes no
    token), so a strict run that finds a cache built without it checks the cache's report: any row it skipped is
    the error a strict build would have raised."""
    if cfg.strict:
        report = json.loads((root / "report.json").read_text())
        for split in ("train", "eval"):
            r = DataReport.from_dict(report[split])
            if r.skipped_by_reason():
                reasons = ", ".join(f"{n:,} {reason}" for reason, n in r.skipped_by_reason().items())
                raise UserError(f"data.strict: the tokenized cache {root}, built without strict, skipped {split} rows "
                                f"({reasons}); the first: {next(iter(r.examples.values()))}")
    return False


def load_prepared(root: Path, in_memory: bool = False):
    """PreparedData memory-mapped from a complete cache directory (datasets and the .npy token counts), or read
    into memory (a directory about to be deleted)."""
    from datasets import Dataset

    def split(name):
        if not (root / name).exists():
            return None
        pairs = TokenizedPairs(Dataset.from_file(str(root / name / "data.arrow"), in_memory=in_memory))
        pairs._sizes, pairs._chosen_len, pairs._prefix_len = (
            np.load(root / f"{name}_{k}.npy", mmap_mode=None if in_memory else "r")
            for k in ("sizes", "chosen_len", "prefix_len"))
        return pairs

    return PreparedData(split("train"), split("eval"), json.loads((root / "report.json").read_text()))


# ----------------------------------------------------------------------------------------------------------------------
# `btrm data prepare`


def row_data(cfg) -> DataConfig:
    """The data settings a packed row is built with: `data.max_tokens` is per rank, so with sequence parallelism a
    row (and so a pair) may hold max_tokens x train.sequence_parallel_size tokens (btrm.sequence_parallel)."""
    sp = cfg.train.sequence_parallel_size
    return cfg.data if sp == 1 else dataclasses.replace(cfg.data, max_tokens=cfg.data.max_tokens * sp)


def load_tokenizer(cfg):
    """The tokenizer training renders with (pad token set as the trainer sets it: it is part of the cache key)."""
    from transformers import AutoTokenizer

    from btrm.modeling import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    ensure_pad_token(tok, cfg.model.pad_token, cfg.data.chat_template_kwargs)
    return tok


def format_report(report: dict) -> str:
    lines = [f"data: {report['train_pairs']:,} training pairs, {report['eval_pairs']:,} held-out pairs"]
    for split in ("train", "eval"):
        r = DataReport.from_dict(report[split])
        lines += [f"  {split} {src}: read {n:,}, kept {r.kept[src]:,}" for src, n in r.read.items()]
        lines += r.log_lines(split)
    return "\n".join(lines)


def prepare_command(config: str, overrides: list[str], num_proc: int | None) -> int:
    from btrm.builtin import resolve_builtins
    from btrm.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = resolve_builtins(load_config(config, overrides), True, lambda: None)
    tok = load_tokenizer(cfg)
    data = row_data(cfg)
    root = cache_root(data, tok, cfg.train.seed)
    t0 = time.perf_counter()
    built = prepare_cache(data, tok, cfg.train.seed, root, num_proc)
    report = json.loads((root / "report.json").read_text())
    print(format_report(report))
    print(f"{'prepared' if built else 'already prepared'}: {root}" + (f" in {time.perf_counter() - t0:.0f} s"
                                                                        if built else ""))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Training: prepare before the process group exists


def prepare_for_training(cfg):
    """(config with built-ins resolved, tokenizer, PreparedData), called by every rank BEFORE the process group is
    created, so however long tokenizing takes no collective is waiting on it.

    Who prepares (data.cache_scope): `node` - the first local rank of each node; nodes that share a file system
    build once, because `prepare_cache` holds the cache's lock (so a shared file system still has one preparer in
    the world). `shared` - global rank 0 only, for file systems without `flock`. Every other rank polls the file
    system for the finished cache (logging while it waits) and memory-maps it."""
    from btrm.builtin import resolve_builtins

    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    preparer = rank == 0 if cfg.data.cache_scope == "shared" else local_rank == 0
    if preparer:
        with file_lock(Path(cfg.data.cache_dir) / "builtin.lock"):
            resolved = resolve_builtins(cfg, True, lambda: None)
    else:  # same paths, built by the preparer: wait for them to appear
        resolved = resolve_builtins(cfg, False, lambda: None)
        built = [resolved.model.name_or_path] + [s.path for s in resolved.data.sources + resolved.data.eval_sources]
        original = [cfg.model.name_or_path] + [s.path for s in cfg.data.sources + cfg.data.eval_sources]
        for path in (Path(b) for b, o in zip(built, original) if b != o):
            wait_for(path, "built-in")
    tokenizer = load_tokenizer(resolved)
    data = row_data(resolved)
    root = cache_root(data, tokenizer, resolved.train.seed)
    if preparer:
        t0 = time.perf_counter()
        if prepare_cache(data, tokenizer, resolved.train.seed, root):
            log.warning("tokenized data cached in %s (%.0f s)", root, time.perf_counter() - t0)
    else:
        wait_for(root / "done.json", "data cache", "prepared by " + ("global rank 0; if caches are node-local, set "
                                                                     "data.cache_scope: node" if cfg.data.cache_scope
                                                                     == "shared" else "local rank 0 of this node"))
    return resolved, tokenizer, load_prepared(root)


def wait_for(path: Path, what: str, who: str = "", poll_s: float = 0.5, log_every_s: float = 60.0) -> None:
    """Block until `path` exists (written by another process). No collective is involved, so nothing times out."""
    t0, next_log = time.monotonic(), log_every_s
    while not path.exists():
        if time.monotonic() - t0 >= next_log:
            log.warning("waiting %.0f s for the %s %s%s", next_log, what, path, f" ({who})" if who else "")
            next_log += log_every_s
        time.sleep(poll_s)
