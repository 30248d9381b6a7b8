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
import os
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from btrm.config import SourceConfig
from btrm.data.pairs import Pair
from btrm.data.sources import BadRow, DataReport, iter_pairs, iter_raw_rows, source_files, source_name

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

    def remove(self, pair: Pair, reason: str) -> None:
        self.removed[pair.source][reason] += 1

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


def read_pairs(sources: list[SourceConfig], tally: Tally, strict: bool = False) -> Iterator[Pair]:
    """Valid pairs of all sources in order; invalid rows are counted in `tally.data` (or raised when strict)."""
    for src in sources:
        yield from iter_pairs(src, tally.data, strict)


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def pair_row(pair: Pair) -> dict[str, Any]:
    return {"chosen": pair.chosen, "rejected": pair.rejected, "source": pair.source, "category": pair.category,
            "margin": pair.margin}


class PairWriter:
    """Streams pairs to .jsonl or .parquet; the file appears under its name only once complete."""

    def __init__(self, path: str | Path, batch_rows: int = 8192):
        self.path = Path(path)
        if self.path.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}: {self.path}")
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.batch_rows, self.rows = batch_rows, []
        self._file = self._parquet = None

    def __enter__(self) -> "PairWriter":
        if self.path.suffix == ".jsonl":
            self._file = self.tmp.open("w", encoding="utf-8")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
            self.schema = pa.schema([("chosen", msg), ("rejected", msg), ("source", pa.string()),
                                     ("category", pa.string()), ("margin", pa.float64())])
            self._parquet = pq.ParquetWriter(self.tmp, self.schema)
        return self

    def write(self, pair: Pair) -> None:
        row = pair_row(pair)
        if self._file is not None:  # jsonl: optional fields only when set
            self._file.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
            return
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def __exit__(self, exc_type, *_) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self._flush()
            self._parquet.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


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
# Steps: Pair stream -> Pair stream, every removal counted


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def dedup_key(pair: Pair) -> bytes:
    """16-byte digest of the normalised (history, chosen response, rejected response)."""
    key = [[[m["role"], _norm_ws(m["content"])] for m in pair.prompt],
           _norm_ws(pair.chosen[-1]["content"]), _norm_ws(pair.rejected[-1]["content"])]
    return hashlib.blake2b(json.dumps(key, ensure_ascii=False).encode(), digest_size=16).digest()


def dedup(pairs: Iterable[Pair], tally: Tally, details: dict) -> Iterator[Pair]:
    """Keep the first occurrence of each key across all sources; details['duplicate_of'][src][first_src] = n."""
    first: dict[bytes, str] = {}
    duplicate_of: dict[str, Counter] = defaultdict(Counter)
    for pair in pairs:
        key = dedup_key(pair)
        seen = first.get(key)
        if seen is None:
            first[key] = pair.source
            yield pair
        else:
            tally.remove(pair, "duplicate")
            duplicate_of[pair.source][seen] += 1
    details["duplicate_of"] = {s: dict(c) for s, c in duplicate_of.items()}


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


def decontaminate(pairs: Iterable[Pair], index: BenchmarkIndex, tally: Tally, details: dict,
                  max_examples: int = 20) -> Iterator[Pair]:
    per_file: Counter = Counter()
    examples = []
    for pair in pairs:
        hit = index.match(pair)
        if hit is None:
            yield pair
            continue
        tally.remove(pair, "contaminated")
        per_file[index.files[hit[1]]] += 1
        if len(examples) < max_examples:
            examples.append({"origin": pair.origin, "source": pair.source, "benchmark": index.files[hit[1]],
                             "ngram": hit[0]})
    details["benchmarks"] = {f: {**index.stats[f], "pairs_matched": per_file[f]} for f in index.files}
    details["contaminated_examples"] = examples


def swap(pairs: Iterable[Pair]) -> Iterator[Pair]:
    return (p.swapped() for p in pairs)


# ----------------------------------------------------------------------------------------------------------------------
# Stats


def _percentiles(values) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": int(a.size), "mean": round(float(a.mean()), 1), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": int(a.max())}


def length_stats(pairs: Iterable[Pair], tokenizer, chat_template_kwargs: dict | None, max_length: int,
                 max_tokens: int, batch_pairs: int = 512) -> tuple[dict, list[int]]:
    """Token lengths through the shared render function: per conversation and per pair (chosen + rejected),
    overall and per source, and the shares training would treat as over-long."""
    from btrm.render import render_text, tokenize_texts

    conv: list[int] = []
    pair_len: dict[str, list[int]] = defaultdict(list)
    over_len = over_tokens = 0

    def flush(batch: list[Pair]) -> None:
        nonlocal over_len, over_tokens
        texts = [render_text(tokenizer, c, chat_template_kwargs) for p in batch for c in (p.chosen, p.rejected)]
        lens = [len(ids) for ids in tokenize_texts(tokenizer, texts)]
        for p, c, r in zip(batch, lens[0::2], lens[1::2]):
            conv.extend((c, r))
            pair_len[p.source].append(c + r)
            over_len += max(c, r) > max_length
            over_tokens += c + r > max_tokens

    batch: list[Pair] = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_pairs:
            flush(batch)
            batch = []
    flush(batch)
    n = sum(len(v) for v in pair_len.values())
    stats = {
        "conversation_tokens": _percentiles(conv),
        "pair_tokens": _percentiles([x for v in pair_len.values() for x in v]),
        "pair_tokens_by_source": {s: _percentiles(v) for s, v in sorted(pair_len.items())},
        "max_length": max_length, "max_tokens": max_tokens,
        "share_conversations_over_max_length": round(sum(x > max_length for x in conv) / max(len(conv), 1), 6),
        "share_pairs_over_max_length": round(over_len / max(n, 1), 6),
        "share_pairs_over_max_tokens": round(over_tokens / max(n, 1), 6),
    }
    return stats, conv


def plot_histogram(lengths: list[int], max_length: int, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("`btrm data stats` draws its histogram with matplotlib: pip install 'btrm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=60, color="#4D5EFF")
    longest = max(lengths, default=0)
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


COMMANDS = ("stats", "clean", "dedup", "decontaminate", "swap")


def run_command(command: str, sources: list[SourceConfig], output: str | Path, *, strict: bool = False,
                benchmark_files: list[str] | None = None, ngram: int = 13, tokenizer=None,
                chat_template_kwargs: dict | None = None, max_length: int = 16384,
                max_tokens: int = 16384) -> dict[str, Any]:
    """Run one curation command; returns the report it also writes next to `output`."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
    if not sources:
        raise ValueError("no data sources given")
    output = Path(output)
    check_not_input(output, sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    details: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    pairs: Iterable[Pair] = read_pairs(sources, tally, strict)
    if command == "dedup":
        settings["key"] = "(history, chosen, rejected); whitespace stripped and runs collapsed; case kept"
        pairs = dedup(pairs, tally, details)
    elif command == "decontaminate":
        if not benchmark_files:
            raise ValueError("decontaminate needs --benchmark-prompts FILE [FILE ...]")
        index = BenchmarkIndex.build(benchmark_files, ngram)
        settings.update(ngram=ngram, unit="whitespace words, lower-cased, punctuation deleted",
                        turns="user turns of the pair vs benchmark prompt fields " + "/".join(BENCHMARK_FIELDS),
                        benchmark_ngrams=len(index.grams))
        pairs = decontaminate(pairs, index, tally, details)
    elif command == "swap":
        pairs = swap(pairs)

    def counted(stream: Iterable[Pair]) -> Iterator[Pair]:
        for p in stream:
            tally.kept[p.source] += 1
            yield p

    if command == "stats":
        if tokenizer is None:
            raise ValueError("stats needs a tokenizer (--tokenizer, or a --config whose model it loads)")
        details, conv = length_stats(counted(pairs), tokenizer, chat_template_kwargs, max_length, max_tokens)
        settings["chat_template_kwargs"] = chat_template_kwargs or {}
        png = output.with_suffix(".png")
        plot_histogram(conv, max_length, png, f"{', '.join(source_name(s) for s in sources)}")
        details["histogram"] = str(png)
    else:
        with PairWriter(output) as writer:
            for pair in counted(pairs):
                writer.write(pair)
    report = {"command": command, "output": str(output),
              "sources": [{"name": source_name(s), "path": s.path, "format": s.format, "swap": s.swap}
                          for s in sources],
              "settings": settings, **tally.report(), **details}
    report_path(output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
