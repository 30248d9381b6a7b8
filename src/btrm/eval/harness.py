"""Run benchmarks with any scorer, save what is needed to recompute them, and print the model card row.

`score_fn(conversations) -> list[float]` is the only thing the harness knows about the model. For a benchmark it
collects every conversation of every unit, scores each DISTINCT conversation once (a completion shared by several
comparisons costs one forward), maps the scores back and applies the benchmark's rule.

Files under out_dir, per benchmark NAME:
  NAME.rows.jsonl     header line {format, benchmark, model, counts}, then one line per unit:
                      {id, subset, meta, scores: {completion: reward}, result[, skipped]}
  NAME.results.json   {benchmark, column, model, overall, subsets, details, notes, counts}; 0-100 scale
  table.md            model card header + this model's row, from every NAME.results.json of the model there
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from btrm.eval.benchmarks import BENCHMARKS, get_benchmark
from btrm.eval.core import Benchmark, Conversation, Unit, mean
from btrm.eval.io import SUFFIXES, read_records

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[Conversation]], Sequence[float]]
LengthFn = Callable[[Conversation], int]
POLICIES = ("score", "skip")  # over max_length: score anyway (the model may truncate or raise) / leave the unit out
ROWS_FORMAT = "btrm-eval-rows/1"


# ---------------------------------------------------------------------------------------------------------------
# Scoring distinct conversations


def _key(conversation: Conversation) -> tuple:
    # role and content only: the loaders keep nothing else in a message (RMB's "language" is dropped)
    return tuple((m["role"], m["content"]) for m in conversation)


def score_units(
    units: list[Unit],
    score_fn: ScoreFn,
    *,
    max_length: int | None = None,
    length_fn: LengthFn | None = None,
    over_length: str = "score",
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Fill `unit.scores` (and `unit.skipped`), scoring each distinct conversation once. Returns the counts.

    chunk_size: conversations per score_fn call (None: one call with all of them); chunks give a progress bar.
    """
    if over_length not in POLICIES:
        raise ValueError(f"over_length={over_length!r}, expected one of {POLICIES}")
    if max_length is not None and length_fn is None:
        raise ValueError("max_length needs a length_fn (conversation -> token count)")

    # refs[u][completion name] = index of its conversation among the distinct ones (first-seen order)
    index: dict[tuple, int] = {}
    distinct: list[Conversation] = []
    refs: list[dict[str, int]] = []
    for u in units:
        ref = {}
        for name, c in u.completions.items():
            key = _key(c)
            if key not in index:
                index[key] = len(distinct)
                distinct.append(c)
            ref[name] = index[key]
        refs.append(ref)

    lengths: list[int] | None = None
    over: set[int] = set()
    if max_length is not None:
        lengths = [length_fn(c) for c in tqdm(distinct, desc="token counts", disable=not progress)]
        over = {i for i, n in enumerate(lengths) if n > max_length}
    if over_length == "skip":
        for u, ref in zip(units, refs):
            u.skipped = any(i in over for i in ref.values())

    needed = sorted({i for u, ref in zip(units, refs) if not u.skipped for i in ref.values()})
    if lengths is not None:  # longest first: similar lengths share a call, and an out-of-memory shows up at once
        needed.sort(key=lambda i: -lengths[i])
    rewards = dict(zip(needed, _call(score_fn, [distinct[i] for i in needed], chunk_size, progress)))
    for u, ref in zip(units, refs):
        u.scores = {} if u.skipped else {name: rewards[i] for name, i in ref.items()}

    return {
        "rows": len(units),
        "rows_skipped": sum(u.skipped for u in units),
        "conversations": sum(len(r) for r in refs),
        "distinct_conversations": len(distinct),
        "scored_conversations": len(needed),
        "over_length": len(over),
        "max_length": max_length,
        "over_length_policy": over_length,
    }


def _call(score_fn: ScoreFn, conversations: list[Conversation], chunk_size: int | None, progress: bool) -> list[float]:
    if not conversations:
        return []
    step = chunk_size or len(conversations)
    out: list[float] = []
    # one call: the scorer shows its own progress (RewardModel.score does); chunks: the harness shows it
    with tqdm(total=len(conversations), desc="scoring", unit="conv", disable=not (progress and chunk_size)) as bar:
        for start in range(0, len(conversations), step):
            chunk = conversations[start : start + step]
            got = [float(x) for x in score_fn(chunk)]
            if len(got) != len(chunk):
                raise ValueError(f"score_fn returned {len(got)} scores for {len(chunk)} conversations")
            out.extend(got)
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Results, per-row file, recompute


def _summarize(bench: Benchmark, units: list[Unit], model_name: str, counts: dict) -> tuple[dict, list]:
    """Apply the benchmark's rule to the units not skipped. Returns (results, one row result per unit)."""
    active = [u for u in units if not u.skipped]
    if not active:
        raise ValueError(f"{bench.name}: no rows left to score ({counts['rows_skipped']} skipped as over-length)")
    row_results, s = bench.score(active)
    it = iter(row_results)
    per_unit = [None if u.skipped else next(it) for u in units]
    notes = list(s.notes)
    if counts["rows_skipped"]:
        notes.append(f"{counts['rows_skipped']} of {counts['rows']} rows skipped: a conversation over max_length")
    results = {
        "benchmark": bench.name,
        "column": bench.column,
        "model": model_name,
        "overall": s.overall,
        "subsets": s.subsets,
        "details": s.details,
        "notes": notes,
        "counts": counts,
    }
    return results, per_unit


def _write_rows(path: Path, bench: Benchmark, model_name: str, counts: dict, units: list[Unit], per_unit: list):
    with open(path, "w", encoding="utf-8") as f:
        header = {"format": ROWS_FORMAT, "benchmark": bench.name, "model": model_name, "counts": counts}
        f.write(json.dumps(header) + "\n")
        for u, result in zip(units, per_unit):
            row = {"id": u.id, "subset": u.subset, "meta": u.meta, "scores": u.scores, "result": result}
            if u.skipped:
                row["skipped"] = True
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def recompute(per_row_file: str | Path) -> dict:
    """Results of a saved NAME.rows.jsonl, without the model: identical to what `evaluate` returned."""
    with open(per_row_file, encoding="utf-8") as f:
        header = json.loads(f.readline())
        if header.get("format") != ROWS_FORMAT:
            raise ValueError(f"{per_row_file}: not a per-row file ({ROWS_FORMAT} header missing)")
        rows = [json.loads(line) for line in f]
    units = [
        Unit(r["id"], r["subset"], completions={}, meta=r["meta"], scores=r["scores"], skipped=r.get("skipped", False))
        for r in rows
    ]
    results, _ = _summarize(get_benchmark(header["benchmark"]), units, header["model"], header["counts"])
    return results


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def evaluate(
    score_fn: ScoreFn,
    benchmark: str,
    data: str | None = None,
    out_dir: str | Path | None = None,
    *,
    model_name: str = "model",
    max_length: int | None = None,
    length_fn: LengthFn | None = None,
    over_length: str = "score",
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Score one benchmark. data: a local file/directory in the benchmark's schema, a Hub id, or None (its Hub
    defaults). Writes NAME.rows.jsonl, NAME.results.json and table.md under out_dir when given."""
    bench = get_benchmark(benchmark)
    units = bench.to_units(read_records(data, bench.hub))
    log.info("%s: %d rows from %s", bench.name, len(units), data or "the Hub")
    counts = score_units(
        units, score_fn, max_length=max_length, length_fn=length_fn, over_length=over_length,
        chunk_size=chunk_size, progress=progress,
    )
    if counts["over_length"]:
        log.warning("%s: %d distinct conversations over max_length=%s (policy %s, %d rows skipped)", bench.name,
                    counts["over_length"], max_length, over_length, counts["rows_skipped"])
    results, per_unit = _summarize(bench, units, model_name, counts)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_rows(out / f"{bench.name}.rows.jsonl", bench, model_name, counts, units, per_unit)
        (out / f"{bench.name}.results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_table(out, model_name)
    return results


def find_data(data_dir: str | Path, name: str) -> Path | None:
    """DIR/NAME (a folder) or DIR/NAME.{json,jsonl,parquet}."""
    for candidate in [Path(data_dir) / name] + [Path(data_dir) / f"{name}{s}" for s in SUFFIXES]:
        if candidate.exists():
            return candidate
    return None


def evaluate_suite(
    score_fn: ScoreFn, data_dir: str | Path, out_dir: str | Path | None = None, **kwargs
) -> dict[str, dict]:
    """Every benchmark found in data_dir (see `find_data`), in card order; missing ones are reported and left '-'."""
    results = {}
    for name in BENCHMARKS:
        path = find_data(data_dir, name)
        if path is None:
            log.warning("%s: no %s or %s.{json,jsonl,parquet} in %s; column left '-'", name, name, name, data_dir)
            continue
        results[name] = evaluate(score_fn, name, str(path), out_dir, **kwargs)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Model card table


def markdown_table(model_name: str, overall: dict[str, float]) -> str:
    """Header + one row: the 7 card columns (benchmark name -> 0-100), '-' when missing. Avg. is the mean of all
    seven, and '-' when any is missing: a mean over fewer columns is not comparable with the card's."""
    values = [overall.get(name) for name in BENCHMARKS]
    avg = mean(values) if all(v is not None for v in values) else None
    cells = [f"{v:.1f}" if v is not None else "-" for v in values + [avg]]
    header = ["Model"] + [b.column for b in BENCHMARKS.values()] + ["Avg."]
    lines = [
        "| " + " | ".join(header) + " |",
        "|:--|" + ":-:|" * (len(header) - 1),
        "| " + " | ".join([model_name] + cells) + " |",
    ]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, model_name: str) -> str:
    overall = {}
    for path in sorted(out_dir.glob("*.results.json")):
        r = json.loads(path.read_text())
        if r.get("model") == model_name and r.get("benchmark") in BENCHMARKS:
            overall[r["benchmark"]] = r["overall"]
    table = markdown_table(model_name, overall)
    (out_dir / "table.md").write_text(table)
    return table
