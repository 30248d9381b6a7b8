"""Raw preference rows -> validated `Pair`s.

Sources: local json / jsonl / parquet / arrow files or directories of them, or Hugging Face Hub dataset ids.
Row formats (per source, or detected per row):
  messages         chosen / rejected are whole message lists sharing the prompt turns (Skywork-80K schema)
  strings          prompt / chosen / rejected are strings
  prompt_messages  prompt is a message list, chosen / rejected are strings
  group            prompt (string or message list) and K >= 2 `responses`, with `scores` or a `ranking` (training
                   and scoring; detected by a `responses` column)
Bad rows are skipped and counted per reason and source, or raised (`strict`) with file, row and field.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from btrm.config import SourceConfig
from btrm.data.pairs import Group, Pair
from btrm.errors import UserError

SUFFIXES = {".json", ".jsonl", ".parquet", ".arrow"}
ROLES = {"system", "user", "assistant", "tool"}


class BadRow(ValueError):
    """A raw row that cannot become a Pair. `reason` is the counted category, `field` the offending column."""

    def __init__(self, reason: str, field: str, detail: str = "", origin: str = ""):
        self.reason, self.field, self.detail, self.origin = reason, field, detail, origin
        super().__init__(f"{origin}: field '{field}': {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # raised in a curation worker process, re-raised in the main one
        return BadRow, (self.reason, self.field, self.detail, self.origin)


@dataclass
class DataReport:
    """What happened to the raw rows: read, kept, skipped per reason and source, over-long handling."""

    read: Counter = field(default_factory=Counter)  # source -> raw rows read
    kept: Counter = field(default_factory=Counter)  # source -> pairs kept
    skipped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # source -> reason -> n
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first offending origin, for the log
    overlong_dropped: Counter = field(default_factory=Counter)
    overlong_truncated: Counter = field(default_factory=Counter)
    overlong_trimmed: Counter = field(default_factory=Counter)  # groups that lost their longest responses to fit

    def skip(self, source: str, err: BadRow) -> None:
        self.skipped[source][err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    def merge(self, other: "DataReport") -> None:
        """Add the counts of `other` (a later part of the same stream: its examples count only for new reasons)."""
        self.read.update(other.read)
        self.kept.update(other.kept)
        for src, c in other.skipped.items():
            self.skipped[src].update(c)
        for reason, origin in other.examples.items():
            self.examples.setdefault(reason, origin)
        self.overlong_dropped.update(other.overlong_dropped)
        self.overlong_truncated.update(other.overlong_truncated)
        self.overlong_trimmed.update(other.overlong_trimmed)

    def skipped_by_reason(self) -> Counter:
        total: Counter = Counter()
        for c in self.skipped.values():
            total.update(c)
        return total

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataReport":
        """Inverse of `as_dict` (the tokenized-data cache keeps the report as JSON)."""
        skipped: dict[str, Counter] = defaultdict(Counter, {s: Counter(c) for s, c in d.get("skipped", {}).items()})
        return cls(Counter(d.get("read", {})), Counter(d.get("kept", {})), skipped, dict(d.get("examples", {})),
                   Counter(d.get("overlong_dropped", {})), Counter(d.get("overlong_truncated", {})),
                   Counter(d.get("overlong_trimmed", {})))

    def log_lines(self, split: str) -> list[str]:
        """What the trainer prints about this split: skipped rows by source and reason (with a first example of
        each reason), over-long pairs dropped or prompt-truncated by source."""
        lines = []
        skipped = {s: dict(c) for s, c in self.skipped.items() if c}
        if skipped:
            lines.append(f"  {split} skipped invalid rows: {json.dumps(skipped)}")
            lines.extend(f"    e.g. {example}" for example in self.examples.values())
        if self.overlong_dropped:
            lines.append(f"  {split} over-long pairs dropped: {json.dumps(dict(self.overlong_dropped))}")
        if self.overlong_truncated:
            lines.append(f"  {split} over-long pairs prompt-truncated: {json.dumps(dict(self.overlong_truncated))}")
        if self.overlong_trimmed:
            lines.append(f"  {split} over-long groups that dropped responses to fit: "
                         f"{json.dumps(dict(self.overlong_trimmed))}")
        return lines

    def metrics(self, split: str) -> dict[str, int]:
        """Counts logged with every step: invalid rows skipped by reason, over-long pairs dropped / truncated."""
        out = {f"data/{split}_skipped/{k}": v for k, v in self.skipped_by_reason().items()}
        out[f"data/{split}_overlong_dropped"] = sum(self.overlong_dropped.values())
        out[f"data/{split}_overlong_truncated"] = sum(self.overlong_truncated.values())
        if self.overlong_trimmed:
            out[f"data/{split}_overlong_trimmed"] = sum(self.overlong_trimmed.values())
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": dict(self.read), "kept": dict(self.kept),
            "skipped": {s: dict(c) for s, c in self.skipped.items() if c},
            "overlong_dropped": dict(self.overlong_dropped), "overlong_truncated": dict(self.overlong_truncated),
            "overlong_trimmed": dict(self.overlong_trimmed),
            "examples": dict(self.examples),
        }

    def summary(self) -> str:
        lines = []
        for src in sorted(self.read):
            sk = self.skipped.get(src, Counter())
            parts = [f"{src}: read {self.read[src]}, kept {self.kept[src]}"]
            if sk:
                parts.append("skipped " + ", ".join(f"{k}={v}" for k, v in sorted(sk.items())))
            if self.overlong_dropped[src]:
                parts.append(f"over-long dropped {self.overlong_dropped[src]}")
            if self.overlong_truncated[src]:
                parts.append(f"prompt-truncated {self.overlong_truncated[src]}")
            if self.overlong_trimmed[src]:
                parts.append(f"responses dropped to fit {self.overlong_trimmed[src]}")
            lines.append("; ".join(parts))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Reading raw rows


def source_name(src: SourceConfig) -> str:
    if src.name:
        return src.name
    p = Path(src.path)
    return p.stem if p.exists() else src.path


def source_files(src: SourceConfig) -> list[Path]:
    """Local files of a source ([] for a Hub id)."""
    p = Path(src.path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        if src.split:  # prefer a split-named subset when present (train-*.parquet, .../train/...)
            named = [f for f in files if src.split in f.stem.split("-")[0] or src.split in f.parent.name]
            files = named or files
        if not files:
            raise FileNotFoundError(f"{p}: no {sorted(SUFFIXES)} files in directory")
        return files
    if p.suffix in SUFFIXES or str(src.path).startswith((".", "/")):
        raise FileNotFoundError(f"data source not found: {src.path}")
    return []


class JsonText(str):
    """A jsonl line not parsed yet: `parse_row` parses it where the row is validated (in a worker process when
    curation runs with --num-proc > 1, so the main process only reads lines)."""


def parse_row(origin: str, row: Any) -> Any:
    if not isinstance(row, JsonText):
        return row
    try:
        return json.loads(row)
    except json.JSONDecodeError as e:
        return BadRow("bad_json", "<row>", str(e), origin)


def iter_file(path: Path, parse: bool = True) -> Iterator[tuple[str, Any]]:
    """(origin, raw row) of one json / jsonl / parquet / arrow file; a jsonl line that is not JSON comes as a
    BadRow in place of its row (parse=False: as unparsed `JsonText`). origin: `file:line` (jsonl, 1-based),
    `file[i]` (json), `file:row i` (others). Shared by training data (`iter_raw_rows`) and benchmark data
    (`btrm.eval.io`)."""
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, parse)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes())
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        except json.JSONDecodeError:  # JSON lines saved as .json
            yield from _iter_jsonl(path)
            return
        if isinstance(data, dict):  # {"data": [...]} or column-oriented
            data = data.get("data", data.get("rows", data))
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    elif path.suffix == ".arrow":
        from datasets import Dataset

        for i, row in enumerate(Dataset.from_file(str(path))):
            yield f"{path}:row {i}", row


def _iter_jsonl(path: Path, parse: bool = True) -> Iterator[tuple[str, Any]]:
    """Lines are decoded one by one, so a line that is not UTF-8 is one bad row (`bad_encoding`), not the
    end of the file."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            origin = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, BadRow("bad_encoding", "<row>", f"not UTF-8: byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1}", origin)
                continue
            if not line.strip():
                continue
            yield origin, parse_row(origin, JsonText(line)) if parse else JsonText(line)


def iter_raw_rows(src: SourceConfig, parse: bool = True) -> Iterator[tuple[str, Any]]:
    """(origin, raw row) pairs; origin names file and row (1-based line for jsonl, 0-based row otherwise).
    parse=False leaves jsonl lines as `JsonText` for `parse_row` to parse later."""
    files = source_files(src)
    count = 0
    if files:
        for f in files:
            for item in iter_file(f, parse):
                if src.max_rows is not None and count >= src.max_rows:
                    return
                count += 1
                yield item
        return
    from datasets import load_dataset  # Hub id

    ds = load_dataset(src.path, split=src.split, streaming=True)
    for i, row in enumerate(ds):
        if src.max_rows is not None and i >= src.max_rows:
            return
        yield f"{src.path}[{src.split}]:row {i}", row


# ----------------------------------------------------------------------------------------------------------------------
# Normalising and validating one row


def validate_messages(value: Any, fld: str, origin: str) -> list[dict]:
    """A message list checked role by role; BadRow names the offending field."""
    if value is None:
        raise BadRow("null_field", fld, "", origin)
    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", fld, f"expected a non-empty list of messages, got {type(value).__name__}", origin)
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow("bad_messages", f"{fld}[{j}]", "expected {role, content}", origin)
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"{fld}[{j}].role", repr(m["role"]), origin)
        if m["content"] is None:
            raise BadRow("null_field", f"{fld}[{j}].content", "", origin)
        if not isinstance(m["content"], str):
            raise BadRow("non_string_content", f"{fld}[{j}].content", type(m["content"]).__name__, origin)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _string(value: Any, fld: str, origin: str) -> str:
    if value is None:
        raise BadRow("null_field", fld, "", origin)
    if not isinstance(value, str):
        raise BadRow("non_string_content", fld, type(value).__name__, origin)
    return value


def detect_format(row: dict) -> str:
    chosen, prompt = row.get("chosen"), row.get("prompt")
    if isinstance(chosen, list):
        return "messages"
    if isinstance(prompt, list):
        return "prompt_messages"
    return "strings"


def _lookup(row: dict, path: str, origin: str) -> Any:
    """A column, or `a[].b`: field b of every element of list column a (nested schemas such as UltraFeedback's
    `completions[].response`). Missing -> None."""
    head, sep, rest = path.partition("[].")
    value = row.get(head)
    if not sep or value is None:
        return value
    if not isinstance(value, list):
        raise BadRow("bad_row", head, f"expected a list, got {type(value).__name__}", origin)
    return [_lookup(x, rest, origin) if isinstance(x, dict) else None for x in value]


def normalize_group(row: dict, src: SourceConfig, origin: str, name: str, scoring: bool = False) -> Group:
    """A group row -> a validated Group (responses best first), or BadRow naming the field.

    `prompt` (a string or a message list) and `responses` (each a string, or the message list that follows the
    prompt), plus exactly one label: `scores` (numbers, higher is better, ties allowed) or `ranking` (response
    indices, best first). `scoring` (btrm score): the label is optional and the responses keep their input order
    (`scores` then in that order, None without scores)."""
    col = {k: src.columns.get(k, k) for k in ("prompt", "responses", "scores", "ranking", "margin", "source",
                                                 "category")}
    get = {k: _lookup(row, c, origin) for k, c in col.items()}
    for k in ("prompt", "responses"):
        if get[k] is None:
            raise BadRow("missing_field" if col[k].partition("[]")[0] not in row else "null_field", col[k], "", origin)
    if isinstance(get["prompt"], list):
        prompt = validate_messages(get["prompt"], col["prompt"], origin)
    else:
        prompt = [{"role": "user", "content": _string(get["prompt"], col["prompt"], origin)}]
    responses = get["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRow("too_few_responses", col["responses"], f"need >= 2, got "
                     f"{len(responses) if isinstance(responses, list) else type(responses).__name__}", origin)
    convs = []
    for i, r in enumerate(responses):
        fld = f"{col['responses']}[{i}]"
        turns = (validate_messages(r, fld, origin) if isinstance(r, list)
                 else [{"role": "assistant", "content": _string(r, fld, origin)}])
        if turns[-1]["role"] != "assistant":
            raise BadRow("last_not_assistant", fld, f"last role is {turns[-1]['role']!r}", origin)
        if not turns[-1]["content"].strip():
            raise BadRow("empty_response", fld, "", origin)
        if any(turns == c[len(prompt):] for c in convs):
            raise BadRow("duplicate_response", fld, "the same text as an earlier response", origin)
        convs.append(prompt + turns)
    scores, ranking = get["scores"], get["ranking"]
    if scoring and scores is None and ranking is None:
        return Group(convs, None, None, name, None, origin)
    if (scores is None) == (ranking is None):
        raise BadRow("missing_field" if scores is None else "two_labels", col["scores"],
                     f"exactly one of {col['scores']!r} / {col['ranking']!r} is needed", origin)
    label = col["scores"] if scores is not None else col["ranking"]
    values = scores if scores is not None else ranking
    if not isinstance(values, list) or len(values) != len(convs):
        raise BadRow("length_mismatch", label, f"{len(values) if isinstance(values, list) else type(values).__name__}"
                     f" labels for {len(convs)} responses", origin)
    if scores is not None:
        for i, v in enumerate(scores):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRow("bad_score", f"{label}[{i}]", repr(v), origin)
        if len(set(scores)) == 1:
            raise BadRow("all_tied", label, f"every response scores {scores[0]}", origin)
        order = sorted(range(len(convs)), key=lambda i: -scores[i])  # stable: tied responses keep their order
        order = list(range(len(convs))) if scoring else order
    else:
        as_index = (v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in ranking)
        if sorted(as_index) != list(range(len(convs))):
            raise BadRow("bad_ranking", label, f"{ranking!r} is not a permutation of 0..{len(convs) - 1}", origin)
        order = list(range(len(convs))) if scoring else list(ranking)
        scores = [-float(ranking.index(i)) for i in range(len(convs))] if scoring else None
    return Group([convs[i] for i in order], [float(scores[i]) for i in order] if scores is not None else None,
                 *_row_extras(get, col, origin, name), origin)


def _row_extras(get: dict, col: dict, origin: str, name: str) -> tuple[float | None, str, str | None]:
    """A row's margin (a finite number or None), source (its own source column wins over the source's name) and
    category, for pairs and groups alike."""
    margin = get["margin"]
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise BadRow("bad_margin", col["margin"], repr(margin), origin)
        margin = float(margin)
    category, row_source = get["category"], get["source"]
    source = row_source if isinstance(row_source, str) and row_source else name
    return margin, source, None if category is None else str(category)


def is_group_row(row: dict, src: SourceConfig) -> bool:
    return src.format == "group" or (src.format == "auto" and src.columns.get("responses", "responses").partition(
        "[]")[0] in row)


def normalize_row(row: Any, src: SourceConfig, origin: str, name: str) -> Pair | Group:
    """One raw row -> a validated Pair (or a Group, for a group row), or BadRow naming the field."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("bad_row", "<row>", f"expected an object, got {type(row).__name__}", origin)
    if is_group_row(row, src):
        return normalize_group(row, src, origin, name)
    col = {k: src.columns.get(k, k) for k in ("prompt", "chosen", "rejected", "margin", "source", "category")}
    for k in ("chosen", "rejected"):
        if col[k] not in row:
            raise BadRow("missing_field", col[k], "", origin)
        if row[col[k]] is None:  # before the format is guessed from it: null is its own reason, not "missing"
            raise BadRow("null_field", col[k], "", origin)
    get = {k: row.get(c) for k, c in col.items()}
    fmt = src.format if src.format != "auto" else detect_format(get)
    if fmt == "messages":
        chosen = validate_messages(get["chosen"], col["chosen"], origin)
        rejected = validate_messages(get["rejected"], col["rejected"], origin)
    else:
        if col["prompt"] not in row:
            raise BadRow("missing_field", col["prompt"], "", origin)
        if fmt == "strings":
            prompt = [{"role": "user", "content": _string(get["prompt"], col["prompt"], origin)}]
        else:
            prompt = validate_messages(get["prompt"], col["prompt"], origin)
        chosen = prompt + [{"role": "assistant", "content": _string(get["chosen"], col["chosen"], origin)}]
        rejected = prompt + [{"role": "assistant", "content": _string(get["rejected"], col["rejected"], origin)}]
    for fld, conv in ((col["chosen"], chosen), (col["rejected"], rejected)):
        if conv[-1]["role"] != "assistant":
            raise BadRow("last_not_assistant", fld, f"last role is {conv[-1]['role']!r}", origin)
        if not conv[-1]["content"].strip():
            raise BadRow("empty_response", fld, "", origin)
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("prompt_mismatch", col["rejected"], "chosen and rejected have different prompt turns", origin)
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRow("identical_responses", col["rejected"], "", origin)
    pair = Pair(chosen, rejected, *_row_extras(get, col, origin, name), origin)
    return pair.swapped() if src.swap else pair


def iter_pairs(src: SourceConfig, report: DataReport, strict: bool = False) -> Iterator[Pair]:
    check_columns(src)
    return validate_rows(src, iter_raw_rows(src), report, strict)


def check_columns(src: SourceConfig) -> None:
    """A parquet / arrow file without the chosen and rejected columns is one error naming the expected and the
    found columns, not a skip of every row."""
    need = [src.columns.get(k, k) for k in ("chosen", "rejected")]
    for f in source_files(src):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            found = pq.ParquetFile(f).schema_arrow.names
        elif f.suffix == ".arrow":
            from datasets import Dataset

            found = Dataset.from_file(str(f)).column_names
        else:
            continue
        if src.columns.get("responses", "responses").partition("[]")[0] in found:  # group rows
            continue
        if missing := [c for c in need if c not in found]:
            raise UserError(f"{f}: missing column(s) {missing}: expected {need} (and 'prompt' unless they are "
                            f"message lists; map other names with data.sources[].columns), found {found}")


def validate_rows(src: SourceConfig, rows: Iterable[tuple[str, Any]], report: DataReport,
                  strict: bool = False) -> Iterator[Pair]:
    """Valid pairs of (origin, raw row) items of `src`; invalid rows counted in `report` (or raised when strict)."""
    name = source_name(src)
    for origin, row in rows:
        report.read[name] += 1
        try:
            pair = normalize_row(parse_row(origin, row), src, origin, name)
            if isinstance(pair, Group):  # curation and calibration read pairs; training reads groups too
                raise BadRow("group_row", src.columns.get("responses", "responses"), "this command takes pairs",
                             origin)
        except BadRow as err:
            if strict:
                raise
            report.skip(name, err)
            continue
        report.kept[name] += 1
        yield pair


def weighted_indices(n: int, weight: float, seed: int) -> list[int]:
    """round(weight * n) row indices: whole repeats plus a seeded sample for the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    idx = list(range(n)) * whole
    extra = round(frac * n)
    if extra:
        idx += sorted(random.Random(seed).sample(range(n), extra))
    return idx


def load_pairs(sources: list[SourceConfig], report: DataReport, strict: bool = False, seed: int = 0) -> list[Pair]:
    """All sources, validated, with per-source weights applied (repeat / subsample)."""
    out: list[Pair] = []
    for k, src in enumerate(sources):
        pairs = list(iter_pairs(src, report, strict))
        if src.weight != 1.0:
            pairs = [pairs[i] for i in weighted_indices(len(pairs), src.weight, seed + k)]
        out.extend(pairs)
    return out
