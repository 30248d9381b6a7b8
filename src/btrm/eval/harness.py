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
from btrm.errors import UserError
from btrm.eval.io import SUFFIXES, HubUnavailable, read_hub, read_records

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[Conversation]], Sequence[float]]
LengthFn = Callable[[Conversation], int]
# What happens to a conversation over max_length tokens:
#   truncate  it is scored with its prompt cut from the left (by the scorer); a row with a conversation whose last
#             turn alone is over max_length (cut_length_fn) is skipped and counted
#   skip      its row is skipped and counted
#   error     the run stops, naming the row
POLICIES = ("truncate", "skip", "error")
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
    cut_length_fn: LengthFn | None = None,
    over_length: str = "truncate",
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Fill `unit.scores` (and `unit.skipped`), scoring each distinct conversation once. Returns the counts.

    length_fn: tokens of a conversation as the scorer renders it; cut_length_fn: tokens left once every prompt
    token is cut (the last turn alone). Without cut_length_fn, "truncate" trusts the scorer with every
    over-long conversation. chunk_size: conversations per score_fn call (None: one call); chunks give a progress bar.
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
    uncut = set(over)  # conversations that cannot be scored within max_length
    if over_length == "truncate":
        uncut = {i for i in over if cut_length_fn(distinct[i]) > max_length} if cut_length_fn else set()
    if over_length == "error" and over:
        u, name, i = next((u, n, i) for u, ref in zip(units, refs) for n, i in ref.items() if i in over)
        raise UserError(f"row {u.id} ({name}): {lengths[i]} tokens > --max-length {max_length} ({len(over)} "
                        f"conversations over it); raise --max-length or pass --over-length truncate / skip")
    for u, ref in zip(units, refs):
        u.skipped = any(i in uncut for i in ref.values())

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
        "truncated": len(over - uncut) if over_length == "truncate" else 0,
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
    why = (f"a conversation over max_length={counts.get('max_length')} tokens"
           if counts.get("over_length_policy") == "skip" else
           f"a conversation whose last turn alone is over max_length={counts.get('max_length')} tokens")
    if not active:
        fix = "raise --max-length" + (" or pass --over-length truncate" if counts.get("over_length_policy") == "skip"
                                      else "")
        raise UserError(f"{bench.name}: no rows left to score: all {counts['rows_skipped']} rows have {why}; {fix}")
    row_results, s = bench.score(active)
    it = iter(row_results)
    per_unit = [None if u.skipped else next(it) for u in units]
    notes = list(s.notes)
    if counts["rows_skipped"]:
        notes.append(f"{counts['rows_skipped']} of {counts['rows']} rows skipped: {why}")
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
    data: str | list[dict] | None = None,
    out_dir: str | Path | None = None,
    *,
    model_name: str = "model",
    max_length: int | None = None,
    length_fn: LengthFn | None = None,
    cut_length_fn: LengthFn | None = None,
    over_length: str = "truncate",
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Score one benchmark. data: a local file/directory in the benchmark's schema, a Hub id, None (its Hub
    defaults), or rows already read (`load_benchmark`). Writes NAME.rows.jsonl, NAME.results.json and table.md
    under out_dir when given. Length handling: see `score_units`."""
    bench = get_benchmark(benchmark)
    records = data if isinstance(data, list) else load_benchmark(benchmark, data)
    units = _units(bench, records)
    log.info("%s: %d rows", bench.name, len(units))
    try:
        counts = score_units(
            units, score_fn, max_length=max_length, length_fn=length_fn, cut_length_fn=cut_length_fn,
            over_length=over_length, chunk_size=chunk_size, progress=progress,
        )
    except UserError as e:
        raise UserError(f"{bench.name}: {e}") from None
    if counts["over_length"]:
        log.info("%s: %d distinct conversations over max_length=%s (policy %s: %d cut from the left, %d rows "
                 "skipped)", bench.name, counts["over_length"], max_length, over_length, counts["truncated"],
                 counts["rows_skipped"])
    results, per_unit = _summarize(bench, units, model_name, counts)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_rows(out / f"{bench.name}.rows.jsonl", bench, model_name, counts, units, per_unit)
        (out / f"{bench.name}.results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_table(out, model_name)
    return results


def load_benchmark(name: str, data: str | None = None) -> list[dict]:
    """Raw rows of a benchmark: `data` (a local file / folder or a Hub id), or its Hub datasets when None."""
    bench = get_benchmark(name)
    if data is None and not bench.hub:
        raise UserError(f"{name}: not on the Hub; {GITHUB_ONLY[name]}")
    try:
        return read_records(data, bench.hub)
    except ValueError as e:  # a bad file: json that is not rows, a jsonl line that is not JSON
        raise UserError(str(e)) from e


def _units(bench: Benchmark, records: list[dict]) -> list[Unit]:
    """bench.to_units, with a missing or malformed field reported as the row and field."""
    try:
        return bench.to_units(records)
    except KeyError as e:
        field = e.args[0]
        i = next((i for i, r in enumerate(records) if isinstance(r, dict) and field not in r), None)
        where = "a row"
        if i is not None:  # its 0-based row within its own file
            source = records[i].get("_source")
            where = f"{source} row {sum(r.get('_source') == source for r in records[:i])}"
        raise UserError(f"{bench.name}: {where} has no field {field!r} (schemas: btrm eval --help)") from e
    except (ValueError, TypeError) as e:
        raise UserError(f"{bench.name}: {e}") from e


# benchmarks whose data is not on the Hub: how to get it
GITHUB_ONLY = {
    "rmb": "clone https://github.com/Zhou-Zoey/RMB-Reward-Model-Benchmark and copy (or link) its RMB_dataset "
           "folder to DIR/rmb, then pass --data-dir DIR (or --data PATH/RMB_dataset)",
}


def find_data(data_dir: str | Path, name: str) -> Path | None:
    """DIR/NAME (a folder) or DIR/NAME.{json,jsonl,parquet}."""
    for candidate in [Path(data_dir) / name] + [Path(data_dir) / f"{name}{s}" for s in SUFFIXES]:
        if candidate.exists():
            return candidate
    return None


def load_suite(data_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """Rows of every benchmark, in card order: from data_dir (`find_data`; a missing entry is logged and left out)
    or, without data_dir, from each benchmark's Hub datasets (RMB is on GitHub only: logged and left out).
    Hub failures are collected and reported together, naming every dataset id that could not be read."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir}: no such folder")
    records: dict[str, list[dict]] = {}
    failed: dict[str, HubUnavailable] = {}
    for name, bench in BENCHMARKS.items():
        if data_dir is not None:
            path = find_data(data_dir, name)
            if path is None:
                log.warning("%s: no %s or %s.{json,jsonl,parquet} in %s; column left '-'", name, name, name, data_dir)
            else:
                records[name] = load_benchmark(name, str(path))
        elif not bench.hub:
            log.warning("%s: not on the Hub, column left '-'; to include it, %s", name, GITHUB_ONLY[name])
        else:
            try:
                records[name] = load_benchmark(name)
            except HubUnavailable as e:
                failed[name] = e
    if failed:
        raise UserError(hub_failure(failed))
    if not records:
        raise UserError(f"--data-dir {data_dir}: no benchmark data inside (layout: btrm eval --help)")
    return records


def hub_failure(failed: dict[str, HubUnavailable], fetching: bool = False) -> str:
    """One line naming every Hub dataset of the failed benchmarks and the way around the Hub."""
    tried = [dataset_id for name in failed for dataset_id, _ in BENCHMARKS[name].hub]
    first = next(iter(failed.values()))
    fix = ("check the network and HF_HUB_OFFLINE" if fetching else
           "where the Hub is reachable run `btrm eval --fetch DIR`, then pass --data-dir DIR (or --data for one "
           "benchmark)")
    return f"cannot read {', '.join(tried)} from the Hub ({first.reason}); {fix}"


def evaluate_suite(
    score_fn: ScoreFn, data_dir: str | Path | None = None, out_dir: str | Path | None = None, **kwargs
) -> dict[str, dict]:
    """Every benchmark of `load_suite(data_dir)`, in card order; the others are left '-'."""
    return {name: evaluate(score_fn, name, rows, out_dir, **kwargs) for name, rows in load_suite(data_dir).items()}


def fetch(data_dir: str | Path) -> dict[str, Path]:
    """Download every Hub benchmark into the --data-dir layout, for machines without the Hub: DIR/NAME.parquet, and
    DIR/ppe-correctness/<dataset>.parquet per PPE Correctness set. RMB (GitHub only) is logged with how to get it.
    Returns benchmark -> path written."""
    out = Path(data_dir)
    written: dict[str, Path] = {}
    failed: dict[str, HubUnavailable] = {}
    for name, bench in BENCHMARKS.items():
        if not bench.hub:
            log.warning("%s: not on the Hub; %s", name, GITHUB_ONLY[name])
            continue
        try:
            parts = [(dataset_id.split("/")[-1], read_hub(dataset_id, split)) for dataset_id, split in bench.hub]
        except HubUnavailable as e:
            failed[name] = e
            continue
        if len(parts) == 1:
            written[name] = _write_parquet(parts[0][1], out / f"{name}.parquet")
        else:  # one file per dataset: its name names the set (ppe.set_name)
            for stem, rows in parts:
                _write_parquet(rows, out / name / f"{stem}.parquet")
            written[name] = out / name
        log.info("%s: %s", name, written[name])
    if failed:
        raise UserError(hub_failure(failed, fetching=True))
    return written


def _write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "_source"} for r in rows]), path)
    return path


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
