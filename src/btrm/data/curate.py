"""Curation of preference data: stats, clean, dedup, decontaminate, swap (the plain-code steps of the Skywork-V2
pipeline, docs/design.md).

Every command reads the sources the way training does (`iter_pairs`: same formats, column maps, `swap`, `max_rows`;
source `weight` is a sampling setting and is not applied here), streams the pairs through one step, and writes:
  - a dataset in the messages schema, `{chosen: [...], rejected: [...], source, category, margin}` (.jsonl or
    .parquet; it reads back as a source in every format btrm accepts), never over an input file;
  - `<output stem>.report.json`: rows read, kept and removed per source and per reason. Rows that are not valid
    pairs (missing / null / empty responses, bad messages, ...) are removed by the shared validator and counted
    under its reasons; the step's own removals are `duplicate` / `contaminated`. For every source
    read = kept + sum(removed).
`stats` writes no dataset: its report is the output, with a PNG histogram next to it.

Normalisation, stated once:
  dedup          key = (history turns with roles, chosen response, rejected response), each text with leading and
                 trailing whitespace stripped and inner whitespace runs collapsed to one space; case kept (it can
                 be the point of a pair). Global across sources, first occurrence kept.
  decontaminate  words = whitespace-split, lower-cased, Unicode punctuation (category P*) deleted, empty words
                 dropped. A pair is dropped when any n consecutive words (default 13) of one of its user turns
                 also occur, consecutively, within one benchmark prompt text. A benchmark text shorter than n
                 words cannot match and is counted as such.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import unicodedata
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from btrm.config import SourceConfig
from btrm.data.pairs import Pair
from btrm.data.sources import BadRow, DataReport, iter_raw_rows, source_files, source_name, validate_rows

OUTPUT_SUFFIXES = (".jsonl", ".parquet")
BENCHMARK_FIELDS = ("prompt", "question", "conversation_input")


# ----------------------------------------------------------------------------------------------------------------------
# Accounting


@dataclass
class Tally:
    """Removals of one step per source and reason, on top of the validator's DataReport."""

    data: DataReport = field(default_factory=DataReport)
    removed: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # source -> reason -> n
    kept: Counter = field(default_factory=Counter)

    def remove(self, source: str, reason: str) -> None:
        self.removed[source][reason] += 1

    def report(self) -> dict[str, Any]:
        sources = list(dict.fromkeys([*self.data.read, *self.removed]))  # in reading order
        removed = {s: dict(self.data.skipped.get(s, Counter()) + self.removed.get(s, Counter())) for s in sources}
        by_reason: Counter = Counter()
        for c in removed.values():
            by_reason.update(c)
        return {
            "read": {s: self.data.read[s] for s in sources},
            "kept": {s: self.kept[s] for s in sources},
            "removed": {s: r for s, r in removed.items() if r},
            "removed_by_reason": dict(sorted(by_reason.items())),
            "invalid_rows": self.data.as_dict()["skipped"],
            "invalid_examples": dict(self.data.examples),
            "totals": {"read": sum(self.data.read.values()), "kept": sum(self.kept.values()),
                       "removed": sum(by_reason.values())},
        }


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def pair_row(pair: Pair) -> dict[str, Any]:
    return {"chosen": pair.chosen, "rejected": pair.rejected, "source": pair.source, "category": pair.category,
            "margin": pair.margin}


def parquet_schema():
    import pyarrow as pa

    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([("chosen", msg), ("rejected", msg), ("source", pa.string()), ("category", pa.string()),
                      ("margin", pa.float64())])


def encode_rows(pairs: list[Pair], suffix: str):
    """Pairs as the output file holds them: jsonl lines (optional fields only when set) or a pyarrow Table."""
    rows = [pair_row(p) for p in pairs]
    if suffix == ".jsonl":
        return [json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n" for r in rows]
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=parquet_schema())


class PairWriter:
    """Writes encoded chunks (`encode_rows`) to .jsonl or .parquet; the file appears under its name only once
    complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}: {self.path}")
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self._file = self._parquet = None

    def __enter__(self) -> "PairWriter":
        if self.path.suffix == ".jsonl":
            self._file = self.tmp.open("w", encoding="utf-8")
        else:
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetWriter(self.tmp, parquet_schema())
        return self

    def write(self, rows, keep: list[bool] | None = None) -> None:
        """The rows of one encoded chunk, only those with keep[i] when given."""
        if self._file is not None:
            self._file.writelines(rows if keep is None else (r for r, k in zip(rows, keep) if k))
            return
        if keep is not None:
            import pyarrow as pa

            rows = rows.filter(pa.array(keep, type=pa.bool_()))
        if rows.num_rows:
            self._parquet.write_table(rows)

    def __exit__(self, exc_type, *_) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self._parquet.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reading in parallel: the main process reads raw rows (jsonl lines unparsed) in chunks; `num_proc` worker processes
# parse and validate them, do the step's per-pair work (`annotate`: a hash, an n-gram match, token lengths) and encode
# the output rows; the main process takes the chunks back in input order and makes every order-dependent decision
# (first occurrence, counts) and writes. So the output is the same for any num_proc; chunk size only sets memory.

CHUNK_ROWS = 4096
Annotate = Callable[[list[Pair]], Any]  # chunk of pairs -> one value per pair (a list or an array)


@dataclass
class Chunk:
    """What the main process gets back for one chunk of raw rows."""

    report: DataReport  # rows read / invalid in this chunk
    sources: list[str]  # per valid pair
    origins: list[str]
    info: Any  # annotate(pairs), or None
    rows: Any  # the valid pairs encoded for the output (encode_rows), or None when there is no output


@dataclass
class Job:
    """What every worker needs, set once per process."""

    sources: list[SourceConfig]
    strict: bool = False
    annotate: Annotate | None = None
    swap: bool = False  # write chosen and rejected exchanged
    suffix: str | None = None  # output format to encode the rows in


_JOB: list[Job] = []


def _init_worker(job: Job) -> None:
    _JOB[:] = [job]


def _work(chunk: tuple[int, list[tuple[str, Any]]]) -> Chunk:
    job = _JOB[0]
    k, raw = chunk
    report = DataReport()
    pairs = list(validate_rows(job.sources[k], raw, report, job.strict))
    if job.swap:
        pairs = [p.swapped() for p in pairs]
    return Chunk(report, [p.source for p in pairs], [p.origin for p in pairs],
                 job.annotate(pairs) if job.annotate is not None and pairs else None,
                 encode_rows(pairs, job.suffix) if job.suffix else None)


def _raw_chunks(sources: list[SourceConfig], rows: int) -> Iterator[tuple[int, list[tuple[str, Any]]]]:
    for k, src in enumerate(sources):
        chunk = []
        for item in iter_raw_rows(src, parse=False):
            chunk.append(item)
            if len(chunk) == rows:
                yield k, chunk
                chunk = []
        if chunk:
            yield k, chunk


def read_chunks(job: Job, tally: "Tally", num_proc: int = 1) -> Iterator[Chunk]:
    """The chunks of all sources in input order; invalid rows are counted in `tally.data` (or raised when strict:
    the first bad row in input order). At most 2 * num_proc chunks are in flight."""
    if num_proc < 1:
        raise ValueError(f"--num-proc must be >= 1, got {num_proc}")
    raw = _raw_chunks(job.sources, CHUNK_ROWS)
    if num_proc == 1:  # the same code in this process
        _init_worker(job)
        for chunk in map(_work, raw):
            tally.data.merge(chunk.report)
            yield chunk
        return
    methods = multiprocessing.get_all_start_methods()  # fork: workers inherit the index / tokenizer, no pickling
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(num_proc, _init_worker, (job,)) as pool:
        pending: deque = deque()
        for item in raw:
            pending.append(pool.apply_async(_work, (item,)))
            if len(pending) >= 2 * num_proc:
                chunk = pending.popleft().get()
                tally.data.merge(chunk.report)
                yield chunk
        while pending:
            chunk = pending.popleft().get()
            tally.data.merge(chunk.report)
            yield chunk


def report_path(output: str | Path) -> Path:
    """out.parquet -> out.report.json (stats: out.json -> out.json itself)."""
    output = Path(output)
    return output if output.suffix == ".json" else output.with_suffix(".report.json")


def check_not_input(output: Path, sources: list[SourceConfig]) -> None:
    """Refuse to write over an input file: curation never edits its inputs in place."""
    inputs = {f.resolve() for s in sources for f in source_files(s)}
    for path in (output, report_path(output)):
        if path.resolve() in inputs:
            raise ValueError(f"{path} is one of the inputs; write the result to a new file")


# ----------------------------------------------------------------------------------------------------------------------
# Steps: the main-process half of each step, called on every chunk in input order; returns which pairs to keep
# (None: all) and counts every removal


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def dedup_key(pair: Pair) -> int:
    """64-bit digest of the normalised (history, chosen response, rejected response). Two different pairs share a
    key with probability n^2 / 2^65 over n pairs: < 1e-4 for 40M pairs."""
    key = [[[m["role"], _norm_ws(m["content"])] for m in pair.prompt],
           _norm_ws(pair.chosen[-1]["content"]), _norm_ws(pair.rejected[-1]["content"])]
    return int.from_bytes(hashlib.blake2b(json.dumps(key, ensure_ascii=False).encode(), digest_size=8).digest(),
                          "little")


def dedup_keys(pairs: list[Pair]) -> np.ndarray:
    """The dedup step's per-pair work (run in the workers)."""
    return np.fromiter((dedup_key(p) for p in pairs), dtype=np.uint64, count=len(pairs))


class SeenKeys:
    """The first source of every key seen so far, in sorted numpy runs merged when a run reaches the size of the one
    before it (a log-structured set): 8 bytes of key + 2 of source per distinct pair, about twice that while two
    runs merge, so memory is ~10-20 MB per million distinct pairs (not ~100 MB with a Python dict)."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys uint64, source index uint16)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def add(self, keys: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """For a chunk in input order: the source index of each key's earlier occurrence, or -1 for first ones
        (which are then remembered)."""
        first_of = np.full(len(keys), -1, dtype=np.int64)
        uniq, first_pos, inverse = np.unique(keys, return_index=True, return_inverse=True)
        earlier = np.full(len(uniq), -1, dtype=np.int64)
        for run_keys, run_src in self.runs:
            i = np.minimum(np.searchsorted(run_keys, uniq), len(run_keys) - 1)
            hit = (run_keys[i] == uniq) & (earlier < 0)
            earlier[hit] = run_src[i[hit]]
        new = earlier < 0
        # within the chunk, every occurrence after the first is a duplicate of the first
        earlier_in_chunk = np.where(new, sources[first_pos], earlier)[inverse]
        later = np.arange(len(keys)) != first_pos[inverse]
        first_of[later | ~new[inverse]] = earlier_in_chunk[later | ~new[inverse]]
        if new.any():
            self.runs.append((uniq[new], sources[first_pos[new]].astype(np.uint16)))
            while len(self.runs) > 1 and len(self.runs[-1][0]) >= len(self.runs[-2][0]):
                (k2, s2), (k1, s1) = self.runs.pop(), self.runs.pop()
                k, src = np.concatenate([k1, k2]), np.concatenate([s1, s2])
                order = np.argsort(k, kind="stable")
                self.runs.append((k[order], src[order]))
        return first_of


class Dedup:
    """Keep the first occurrence of each key across all sources; details: duplicate_of[src][first_src] = n."""

    def __init__(self, tally: Tally):
        self.tally, self.seen, self.names = tally, SeenKeys(), {}
        self.duplicate_of: dict[str, Counter] = defaultdict(Counter)

    def __call__(self, chunk: Chunk) -> list[bool] | None:
        if not chunk.sources:
            return None
        src = np.fromiter((self.names.setdefault(s, len(self.names)) for s in chunk.sources), dtype=np.int64,
                          count=len(chunk.sources))
        if len(self.names) > 65535:
            raise ValueError("dedup counts at most 65,535 distinct source names")
        first = self.seen.add(chunk.info, src).tolist()
        for source, f in zip(chunk.sources, first):
            if f >= 0:
                self.tally.remove(source, "duplicate")
                self.duplicate_of[source][f] += 1
        return [f < 0 for f in first]

    def details(self) -> dict[str, Any]:
        by_index = list(self.names)
        return {"duplicate_of": {s: {by_index[k]: n for k, n in c.items()} for s, c in self.duplicate_of.items()},
                "distinct_keys": len(self.seen)}


_PUNCT: dict[int, None] | None = None


def words(text: str) -> list[str]:
    """Whitespace tokens, lower-cased, punctuation deleted (the decontamination unit)."""
    global _PUNCT
    if _PUNCT is None:
        _PUNCT = {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}
    return [w for w in (t.translate(_PUNCT) for t in text.lower().split()) if w]


def ngrams(text: str, n: int) -> Iterator[str]:
    w = words(text)
    for i in range(len(w) - n + 1):
        yield " ".join(w[i:i + n])


def _prompt_texts(value: Any) -> Iterator[str]:
    """Texts of a benchmark prompt field: a string, a list of strings, or a message list ({role, content})."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        if isinstance(value.get("content"), str):
            yield value["content"]
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _prompt_texts(v)


@dataclass
class BenchmarkIndex:
    """Every n-gram of the benchmark prompts -> index of the file it came from."""

    n: int
    files: list[str]
    grams: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Counter] = field(default_factory=dict)  # file -> rows / prompts / too_short / no_prompt_field

    @classmethod
    def build(cls, files: list[str], n: int = 13) -> "BenchmarkIndex":
        index = cls(n, [str(f) for f in files])
        for k, path in enumerate(index.files):
            st = index.stats[path] = Counter()
            for origin, row in iter_raw_rows(SourceConfig(path=path)):
                if isinstance(row, BadRow):
                    raise ValueError(f"benchmark file {row}")
                st["rows"] += 1
                texts = [t for f in BENCHMARK_FIELDS if isinstance(row, dict) and f in row
                         for t in _prompt_texts(row[f])]
                if not texts:
                    st["no_prompt_field"] += 1
                    continue
                for text in texts:
                    st["prompt_texts"] += 1
                    grams = list(ngrams(text, n))
                    if not grams:
                        st["shorter_than_n"] += 1
                    for g in grams:
                        index.grams.setdefault(g, k)
            if not st["prompt_texts"]:
                raise ValueError(f"{path}: no benchmark prompts found (looked for fields {list(BENCHMARK_FIELDS)})")
        return index

    def match(self, pair: Pair) -> tuple[str, int] | None:
        """(n-gram, file index) of the first shared n-gram of the pair's user turns, or None."""
        for m in pair.prompt:
            if m["role"] == "user":
                for g in ngrams(m["content"], self.n):
                    k = self.grams.get(g)
                    if k is not None:
                        return g, k
        return None


def match_all(index: BenchmarkIndex, pairs: list[Pair]) -> list[tuple[str, int] | None]:
    """The decontaminate step's per-pair work (run in the workers)."""
    return [index.match(p) for p in pairs]


class Decontaminate:
    """Drop pairs whose user turns share an n-gram with a benchmark prompt (`match_all` ran in the workers)."""

    def __init__(self, index: BenchmarkIndex, tally: Tally, max_examples: int = 20):
        self.index, self.tally, self.max_examples = index, tally, max_examples
        self.per_file: Counter = Counter()
        self.examples: list[dict] = []

    def __call__(self, chunk: Chunk) -> list[bool] | None:
        if not chunk.sources:
            return None
        for source, origin, hit in zip(chunk.sources, chunk.origins, chunk.info):
            if hit is not None:
                self.tally.remove(source, "contaminated")
                self.per_file[self.index.files[hit[1]]] += 1
                if len(self.examples) < self.max_examples:
                    self.examples.append({"origin": origin, "source": source,
                                          "benchmark": self.index.files[hit[1]], "ngram": hit[0]})
        return [hit is None for hit in chunk.info]

    def details(self) -> dict[str, Any]:
        return {"benchmarks": {f: {**self.index.stats[f], "pairs_matched": self.per_file[f]} for f in self.index.files},
                "contaminated_examples": self.examples}


# ----------------------------------------------------------------------------------------------------------------------
# Stats


def _percentiles(values) -> dict[str, float]:
    a = np.asarray(values)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": int(a.size), "mean": round(float(a.mean()), 1), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": int(a.max())}


def pair_lengths(tokenizer, chat_template_kwargs: dict | None, pairs: list[Pair]) -> np.ndarray:
    """The stats step's per-pair work (run in the workers): rendered token lengths, shape (pairs, 2)."""
    from btrm.render import render_text, tokenize_texts

    texts = [render_text(tokenizer, c, chat_template_kwargs) for p in pairs for c in (p.chosen, p.rejected)]
    lens = [len(ids) for ids in tokenize_texts(tokenizer, texts)]
    return np.asarray(lens, dtype=np.int64).reshape(-1, 2)


def length_stats(chunks: Iterable[Chunk], max_length: int, max_tokens: int) -> tuple[dict, np.ndarray]:
    """Token lengths through the shared render function (`pair_lengths` ran in the workers): per conversation and
    per pair (chosen + rejected), overall and per source, and the shares training would treat as over-long."""
    per_source: dict[str, list[np.ndarray]] = defaultdict(list)
    parts = []
    for chunk in chunks:
        if not chunk.sources:
            continue
        parts.append(chunk.info)
        src = np.asarray(chunk.sources, dtype=object)
        for name in dict.fromkeys(chunk.sources):
            per_source[name].append(chunk.info[src == name].sum(axis=1))
    lens = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    conv, pair_len = lens.reshape(-1), lens.sum(axis=1)
    n = len(lens)
    stats = {
        "conversation_tokens": _percentiles(conv),
        "pair_tokens": _percentiles(pair_len),
        "pair_tokens_by_source": {s: _percentiles(np.concatenate(v)) for s, v in sorted(per_source.items())},
        "max_length": max_length, "max_tokens": max_tokens,
        "share_conversations_over_max_length": round(int((conv > max_length).sum()) / max(len(conv), 1), 6),
        "share_pairs_over_max_length": round(int((lens.max(axis=1, initial=0) > max_length).sum()) / max(n, 1), 6),
        "share_pairs_over_max_tokens": round(int((pair_len > max_tokens).sum()) / max(n, 1), 6),
    }
    return stats, conv


def plot_histogram(lengths, max_length: int, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("`btrm data stats` draws its histogram with matplotlib: pip install 'btrm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=60, color="#4D5EFF")
    longest = int(np.max(lengths, initial=0))
    label = f"max_length = {max_length:,}"
    if max_length <= 2 * longest:  # draw the limit where it does not squash the data into one bar
        ax.axvline(max_length, color="#D33", linestyle="--", label=label)
    else:
        ax.plot([], [], " ", label=f"{label} (beyond the longest, {longest:,})")
    ax.set(xlabel="tokens per conversation (chosen and rejected, rendered)", ylabel="conversations", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# One command end to end


COMMANDS = ("stats", "clean", "dedup", "decontaminate", "swap", "filter")


def run_command(command: str, sources: list[SourceConfig], output: str | Path, *, strict: bool = False,
                num_proc: int = 1, benchmark_files: list[str] | None = None, ngram: int = 13, tokenizer=None,
                chat_template_kwargs: dict | None = None, max_length: int = 16384, max_tokens: int = 16384,
                score=None, scorer_info: dict | None = None, rule=None) -> dict[str, Any]:
    """Run one curation command; returns the report it also writes next to `output`.

    num_proc: worker processes that parse, validate, do each pair's work and encode the output (the output and
    the report are the same for any value). filter: `score` (rm_filter.local_scorer / remote_scorer) and `rule`
    (rm_filter.FilterRule)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
    if not sources:
        raise ValueError("no data sources given")
    output = Path(output)
    check_not_input(output, sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    settings: dict[str, Any] = {}
    job = Job(sources, strict, swap=command == "swap", suffix=None if command == "stats" else output.suffix)
    step = None
    if command == "dedup":
        settings["key"] = "(history, chosen, rejected); whitespace stripped and runs collapsed; case kept"
        job.annotate, step = dedup_keys, Dedup(tally)
    elif command == "decontaminate":
        if not benchmark_files:
            raise ValueError("decontaminate needs --benchmark-prompts FILE [FILE ...]")
        index = BenchmarkIndex.build(benchmark_files, ngram)
        settings.update(ngram=ngram, unit="whitespace words, lower-cased, punctuation deleted",
                        turns="user turns of the pair vs benchmark prompt fields " + "/".join(BENCHMARK_FIELDS),
                        benchmark_ngrams=len(index.grams))
        job.annotate, step = partial(match_all, index), Decontaminate(index, tally)
    elif command == "stats":
        if tokenizer is None:
            raise ValueError("stats needs a tokenizer (--tokenizer, or a --config whose model it loads)")
        job.annotate = partial(pair_lengths, tokenizer, chat_template_kwargs)
    elif command == "filter":
        if score is None or rule is None:
            raise ValueError("filter needs a scorer (--model or --server) and a rule (--max-disagreement, "
                             "--margin-band)")
        from btrm.data.rm_filter import RMFilter, scores_path

        settings.update(rule.settings(), scorer=scorer_info or {})
        step = RMFilter(score, rule, tally, scores_path(output))
    if job.suffix:
        PairWriter(output)  # a bad suffix fails before any work
    chunks = read_chunks(job, tally, num_proc)

    if command == "stats":
        def counted():
            for chunk in chunks:
                tally.kept.update(chunk.sources)
                yield chunk

        details, conv = length_stats(counted(), max_length, max_tokens)
        settings["chat_template_kwargs"] = chat_template_kwargs or {}
        png = output.with_suffix(".png")
        plot_histogram(conv, max_length, png, f"{', '.join(source_name(s) for s in sources)}")
        details["histogram"] = str(png)
    else:
        with PairWriter(output) as writer:
            for chunk in chunks:
                keep = step(chunk) if step is not None else None
                tally.kept.update(chunk.sources if keep is None else (s for s, k in zip(chunk.sources, keep) if k))
                if chunk.rows is not None:
                    writer.write(chunk.rows, keep)
        details = step.details() if step is not None else {}
    report = {"command": command, "output": str(output),
              "sources": [{"name": source_name(s), "path": s.path, "format": s.format, "swap": s.swap}
                          for s in sources],
              "settings": settings, **tally.report(), **details}
    report_path(output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
