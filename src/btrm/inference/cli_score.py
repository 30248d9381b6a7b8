"""`btrm score`: rewards for a file of conversations or preference pairs, streamed and resumable.

Input rows (jsonl, or any file the trainer reads: json / parquet / arrow):
  conversation  {"messages": [...]} or {"conversation": [...]}  -> {"row", "id"?, "reward"}
  pair          any row format the trainer accepts             -> {"row", "id"?, "chosen", "rejected", "preferred"}
  group         {"prompt", "responses": [...], scores / ranking optional}
                                                               -> {"row", "id"?, "rewards", "ranking", "top1_correct"?}
                (`rewards` in input order; `ranking`: response indices by reward, best first, ties in input order;
                `top1_correct` when the row has labels: its highest reward is a best response)
One output line per input row (blank lines are not rows), in order; `row` is the 0-based input row, `id` is copied
when the input has one. With --skip-bad a bad row gets {"row", "error"} instead, so counts stay aligned. An existing
output is resumed: its rows are skipped in the input (by count) and the file is appended to.

--normalize writes (r - mean) / std with the checkpoint's stored calibration. --calibrate stores that calibration
(btrm.calibration): the mean and std of every reward of --output once scored, or, without --input, of the held-out
pairs of the run that wrote the checkpoint (its btrm_config.yaml).

Rows are packed and scored in chunks of --chunk-rows that start at fixed row numbers (0, chunk, 2 * chunk, ...). A
resume re-scores the chunk it lands in and writes only the missing rows, so every row is packed with the same
neighbours as in an uninterrupted run and the output is identical bit for bit (same --chunk-rows and
--batch-tokens). A different packing changes the matmul shapes and so the rounding: up to 5.7e-6 in fp32 on CPU,
and possibly a bf16 ulp on a GPU, enough to flip a close pair (BENCHMARKS.md, "Resumed scoring").

--server scores on running servers, and under torchrun / deepspeed every rank scores a shard: see
btrm.inference.score_parallel (a shard's chunks keep the same fixed boundaries, counted within the shard).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from btrm import attention
from btrm.calibration import heldout_pairs, stats, store
from btrm.config import SourceConfig
from btrm.data.sources import (BadRow, is_group_row, iter_raw_rows, normalize_group, normalize_row,
                               validate_messages)
from btrm.inference import score_parallel
from btrm.inference.score_parallel import Shard
from btrm.inference.scorer import pair_scores

CONVERSATION_KEYS = ("messages", "conversation")


class Stop(Exception):
    """Ends the run with a message and exit status 2 (rows scored so far are kept in the output)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir or Hub id (one-label *ForSequenceClassification)")
    p.add_argument("--input", help="jsonl (or json / parquet / arrow) of conversations or pairs")
    p.add_argument("--output", help="jsonl of rewards; resumed if it exists (see --overwrite)")
    p.add_argument("--normalize", action="store_true",
                   help="write (r - mean) / std with the checkpoint's stored calibration (default: raw rewards)")
    p.add_argument("--calibrate", action="store_true",
                   help="store the reward mean/std in the checkpoint (btrm_meta.json, config.json, README.md): of "
                        "every reward in --output, or without --input of the run's held-out pairs")
    p.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per packed forward")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows read, scored and written at a time")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    p.add_argument("--attn-implementation", default="auto", choices=attention.CHOICES, help=attention.help_text())
    p.add_argument("--max-length", type=int, default=None, help="longest conversation in tokens "
                   "(default: min(max_position_embeddings, 16384), not the training length)")
    p.add_argument("--truncation", choices=["error", "left"], default="error",
                   help="over-long conversations: error, or cut the prompt from the left (the last turn stays whole)")
    p.add_argument("--chat-template-kwargs", type=json.loads, default=None,
                   help='JSON, e.g. \'{"date_string": "26 Jul 2024"}\' (default: the checkpoint\'s btrm_meta.json)')
    p.add_argument("--no-share-prompt", action="store_true",
                   help="encode every conversation whole (default: a prompt several rows share is encoded once)")
    p.add_argument("--skip-bad", action="store_true", help="write {row, error} for bad rows instead of stopping")
    p.add_argument("--trust-remote-code", action="store_true")
    score_parallel.add_arguments(p)


@dataclass
class Tally:
    rows: int = 0
    conversations: int = 0
    pairs: int = 0
    groups: int = 0
    top1: int = 0  # groups with labels whose highest reward is a best response
    labelled: int = 0
    correct: int = 0  # chosen scored above rejected
    ties: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        self.rows += 1
        if "error" in rec:
            self.bad += 1
            if len(self.bad_examples) < 3:
                self.bad_examples.append(rec["error"])
        elif "reward" in rec:
            self.conversations += 1
        elif "rewards" in rec:
            self.groups += 1
            if "top1_correct" in rec:
                self.labelled += 1
                self.top1 += rec["top1_correct"]
        else:
            self.pairs += 1
            self.correct += rec["preferred"] == "chosen"
            self.ties += rec["preferred"] == "tie"

    def report(self) -> str:
        lines = [f"rows: {self.rows} (conversations {self.conversations}, pairs {self.pairs}, "
                 + (f"groups {self.groups}, " if self.groups else "") + f"bad {self.bad})"]
        if self.pairs:
            lines.append(f"pair accuracy: {self.correct / self.pairs:.4f} ({self.correct}/{self.pairs} chosen > "
                         f"rejected; ties {self.ties})")
        if self.labelled:
            lines.append(f"group top-1 accuracy: {self.top1 / self.labelled:.4f} ({self.top1}/{self.labelled} "
                         "labelled groups whose highest reward is a best response)")
        lines += [f"  bad row: {e}" for e in self.bad_examples]
        return "\n".join(lines)


def read_done(path: Path, tally: Tally, shard: Shard = Shard()) -> int:
    """Rows already in an output file (a torn last line is cut off); tallies them for the final accuracy."""
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):  # interrupted mid-line
            f.truncate(keep)
    for k, line in enumerate(data[:keep].splitlines()):
        rec = json.loads(line)
        if rec.get("row") != shard.row(k):
            raise Stop(f"{path} line {k + 1} has row {rec.get('row')!r}, expected {shard.row(k)}: not an output of "
                       "`btrm score`; use --overwrite or another --output")
        tally.add(rec)
    return tally.rows


def parse_row(raw: Any, origin: str, name: str) -> tuple[str, Any]:
    """("conversation", messages), ("pair", Pair) or ("group", Group in input order); BadRow naming the field
    otherwise."""
    if isinstance(raw, BadRow):
        raise raw
    if not isinstance(raw, dict):
        raise BadRow("bad_row", "<row>", f"expected an object, got {type(raw).__name__}", origin)
    for key in CONVERSATION_KEYS:
        if key in raw:
            conv = validate_messages(raw[key], key, origin)
            if conv[-1]["role"] != "assistant":  # the reward is read at the end of a response: none to read here
                raise BadRow("last_not_assistant", key, f"last role is {conv[-1]['role']!r}", origin)
            return "conversation", conv
    if is_group_row(raw, SourceConfig()):
        return "group", normalize_group(raw, SourceConfig(), origin, name, scoring=True)
    if "chosen" not in raw:
        raise BadRow("missing_field", "messages", "expected 'messages' / 'conversation' (a conversation) or "
                     "'chosen' and 'rejected' (a preference pair)", origin)
    return "pair", normalize_row(raw, SourceConfig(), origin, name)


def group_record(rewards: list[float], scores: list[float] | None) -> dict[str, Any]:
    """A group's output: rewards in input order, the predicted ranking (best first, ties in input order) and, when
    the row has labels, whether its highest reward is a best response (`top1_correct`)."""
    ranking = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    rec: dict[str, Any] = {"rewards": rewards, "ranking": ranking}
    if scores is not None:
        rec["top1_correct"] = scores[ranking[0]] == max(scores)
    return rec


class ChunkScorer:
    """Scores a chunk of parsed rows together (one packing over all their conversations) and writes it."""

    def __init__(self, rm, out, tally: Tally, args, bar=None, done: int = 0, shard: Shard = Shard()):
        self.rm, self.out, self.tally, self.args, self.bar = rm, out, tally, args, bar
        self.done, self.shard = done, shard  # the shard's first `done` rows are already in the output

    def is_new(self, row: int) -> bool:
        """Input row `row` is not in the output yet (rows before it in its chunk are scored for packing only)."""
        return self.shard.index(row) >= self.done

    def __call__(self, rows: list[tuple[int, str, str, Any, Any]]) -> None:
        """rows: (row index, origin, kind, conversation(s), id); kind "bad" carries the error message."""
        convs, owner, fields = [], [], []
        for k, (_, _, kind, item, _) in enumerate(rows):
            if kind == "conversation":
                convs.append(item)
                owner.append(k)
                fields.append("messages")
            elif kind == "pair":
                convs += [item.chosen, item.rejected]
                owner += [k, k]
                fields += ["chosen", "rejected"]
            elif kind == "group":
                convs += item.responses
                owner += [k] * len(item.responses)
                fields += [f"responses[{i}]" for i in range(len(item.responses))]
        encoded = self.rm.encode_each(convs)
        errors: dict[int, str] = {}
        for k, fld, ids in zip(owner, fields, encoded):
            if not isinstance(ids, list) and k not in errors:
                msg = (f"{rows[k][1]}: field '{fld}': {ids.length} tokens > max length {ids.max_length} ("
                       + (ids.why or "--truncation left cuts the prompt from the left") + ")")
                if not self.args.skip_bad and self.is_new(rows[k][0]):
                    if k:  # score the rows before it, so a resume starts at the bad row
                        self(rows[:k])
                    raise Stop(f"{msg} (or pass --skip-bad)")
                errors[k] = msg
        keep = [i for i, k in enumerate(owner) if k not in errors]
        rewards = self.rm.score_ids([encoded[i] for i in keep], self.args.batch_tokens, progress=False,
                                    normalize=self.args.normalize)
        by_row: dict[int, list[float]] = defaultdict(list)  # row -> [reward] or [chosen, rejected]
        for i, r in zip(keep, rewards):
            by_row[owner[i]].append(r)
        self.write(rows, by_row, errors)
        if self.bar is not None:
            self.bar.update(sum(self.is_new(r[0]) for r in rows))

    def write(self, rows, by_row: dict[int, list[float]], errors: dict[int, str]) -> None:
        for k, (row, _, kind, item, row_id) in enumerate(rows):
            if not self.is_new(row):
                continue
            rec: dict[str, Any] = {"row": row}
            if row_id is not None:
                rec["id"] = row_id
            if kind == "bad":
                rec["error"] = item
            elif k in errors:
                rec["error"] = errors[k]
            elif kind == "conversation":
                rec["reward"] = by_row[k][0]
            elif kind == "group":
                rec.update(group_record(by_row[k], item.scores))
            else:
                rec.update(pair_scores([by_row[k][0]], [by_row[k][1]])[0].as_dict())
            self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.tally.add(rec)
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    try:
        rank, world, local_rank = score_parallel.launcher_rank()
        if world > 1:
            if args.calibrate or args.input is None or args.output is None:
                raise Stop("under a launcher every rank scores a shard of --input into --output; run --calibrate "
                           "in one process")
            return score_parallel.score_ranks(args, rank, world, local_rank)
        return score_file(args)
    except Stop as e:
        print(f"btrm score: error: {e}", file=sys.stderr)
        return 2


def score_file(args: argparse.Namespace) -> int:
    if args.calibrate:
        if args.normalize:
            raise Stop("--calibrate stores raw-reward stats: drop --normalize")
        if not Path(args.model, "config.json").is_file():
            raise Stop(f"--calibrate writes into the checkpoint: {args.model} is not a local checkpoint directory")
        if args.input is None and args.output is None:
            return calibrate_heldout(args)
    if args.input is None or args.output is None:
        raise Stop("--input and --output are required (only --calibrate runs without them)")
    rc = score_rows(args)
    if args.calibrate:
        rewards = [x for rec in _records(Path(args.output)) for x in (
            [rec["reward"]] if "reward" in rec else [rec["chosen"], rec["rejected"]] if "chosen" in rec
            else rec.get("rewards", []))]
        _store(args.model, stats(rewards, f"btrm score --input {args.input}"))
    return rc


def calibrate_heldout(args: argparse.Namespace) -> int:
    """Mean/std of the rewards of the checkpoint's held-out pairs (both sides), stored in the checkpoint."""
    pairs = heldout_pairs(args.model)
    rm = score_parallel.load_model(args)
    scores = rm.score_pairs([p.chosen for p in pairs], [p.rejected for p in pairs], args.batch_tokens)
    print(f"btrm score: held-out pair accuracy {sum(s.preferred == 'chosen' for s in scores) / len(scores):.4f} "
          f"({len(scores)} pairs)")
    _store(args.model, stats([x for s in scores for x in (s.chosen, s.rejected)], "held-out pairs"))
    return 0


def _store(model: str, cal: dict) -> None:
    store(model, cal)
    print(f"btrm score: calibration of {model}: mean {cal['mean']:.6g}, std {cal['std']:.6g} over {cal['n']} "
          f"rewards ({cal['source']}); stored in btrm_meta.json, config.json and README.md")


def _records(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def score_rows(args: argparse.Namespace, shard: Shard = Shard(), out_path: Path | None = None) -> int:
    """Score this process's rows (its shard under a launcher) of --input into `out_path` (--output), resuming."""
    out_path = Path(out_path or args.output)
    if args.overwrite and out_path.exists():
        out_path.unlink()
    tally = Tally()
    done = read_done(out_path, tally, shard)
    if done:
        print(f"btrm score: resuming {out_path}: {done} rows already scored", file=sys.stderr)
    rm = score_parallel.load_model(args)
    if args.normalize and not rm.calibration:
        rm.normalize([])  # no calibration: stop before any row is scored
    print(f"btrm score: {rm.length_note()}", file=sys.stderr)
    name = Path(args.input).stem
    t0, new_rows = time.perf_counter(), 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out, tqdm(desc="scoring", unit="row", initial=done) as bar:
        score_chunk = ChunkScorer(rm, out, tally, args, bar, done, shard)
        start = done - done % args.chunk_rows  # a resume re-packs the whole chunk it lands in (fixed boundaries)
        chunk: list[tuple[int, str, str, Any, Any]] = []
        for row, (origin, raw) in enumerate(iter_raw_rows(SourceConfig(path=args.input))):
            k = shard.index(row)  # position in this rank's shard (the row itself with one process)
            if k is None or k < start:
                continue
            row_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                kind, item = parse_row(raw, origin, name)
            except BadRow as e:
                if not args.skip_bad and k >= done:
                    score_chunk(chunk)
                    raise Stop(f"{e} (or pass --skip-bad)") from None
                kind, item = "bad", str(e)
            chunk.append((row, origin, kind, item, row_id))
            new_rows += k >= done
            if len(chunk) >= args.chunk_rows:
                score_chunk(chunk)
                chunk = []
        if chunk:
            score_chunk(chunk)
    dt = time.perf_counter() - t0
    print(f"btrm score: wrote {new_rows} rows to {out_path} in {dt:.1f}s ({new_rows / max(dt, 1e-9):.1f} rows/s)")
    print(tally.report())
    print(f"btrm score: {rm.token_report()}")
    return 0
