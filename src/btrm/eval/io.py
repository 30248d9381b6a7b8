"""Raw benchmark rows from local files (json / jsonl / parquet, a file or a directory of them) or the Hub.

A directory means every such file inside it, recursively: give it one split only (a Hub snapshot of
allenai/reward-bench holds both `raw` and `filtered`; point at the filtered file).

Every record gets `_source`: the file's path relative to the given directory without its suffix (a single file:
its stem; a Hub dataset: the name after the owner). Benchmarks split into several files (PPE Correctness, RMB)
use it to name their parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from btrm.data.sources import BadRow, iter_file
from btrm.errors import UserError

SUFFIXES = (".json", ".jsonl", ".parquet")


def read_records(source: str | None, hub: Sequence[tuple[str, str]]) -> list[dict]:
    """Rows of `source` (a local path or a Hub id); `None` reads the benchmark's default Hub datasets."""
    if source is None:
        return [r for dataset_id, split in hub for r in read_hub(dataset_id, split)]
    path = Path(source)
    if path.is_dir():
        files = sorted(  # hidden entries (.cache of a Hub download) are not data
            p for p in path.rglob("*")
            if p.is_file() and p.suffix in SUFFIXES and not any(x.startswith(".") for x in p.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(SUFFIXES)} files inside")
        return [r for f in files for r in _read_file(f, f.relative_to(path).with_suffix("").as_posix())]
    if path.is_file():
        return _read_file(path, path.stem)
    if path.suffix in SUFFIXES or source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such file or directory (and not a Hub id 'owner/name')")
    split = dict(hub).get(source, hub[0][1] if hub else "train")
    return read_hub(source, split)


def _read_file(path: Path, source: str) -> list[dict]:
    """Every row of one file (the reader training data uses too); a bad jsonl line fails naming file:line."""
    rows = []
    for _origin, row in iter_file(path):
        if isinstance(row, BadRow):
            raise ValueError(str(row))
        rows.append(row)
    for r in rows:
        r["_source"] = source
    return rows


class HubUnavailable(UserError):
    """A Hub dataset could not be read: offline, unreachable, or no such dataset / split."""

    def __init__(self, dataset_id: str, split: str, cause: Exception):
        self.dataset_id, self.split = dataset_id, split
        self.reason = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
        super().__init__(f"cannot read {dataset_id} (split {split}) from the Hub: {self.reason}")


def read_hub(dataset_id: str, split: str) -> list[dict]:
    from datasets import load_dataset  # heavy; only when a Hub id is used

    name = dataset_id.split("/")[-1]
    try:
        ds = load_dataset(dataset_id, split=split)
    except (OSError, ValueError) as e:  # offline / unreachable (ConnectionError), unknown id or split
        raise HubUnavailable(dataset_id, split, e) from None
    return [dict(r, _source=name) for r in ds]
