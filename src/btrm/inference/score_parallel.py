"""`btrm score` beyond one local process: a fleet of servers (--server), or every rank of a launcher.

Servers: `remote_reward_model` renders, length-checks and tokenizes with the checkpoint (--model) exactly as local
scoring does and sends the templated texts to the servers; output, resume and accuracy are those of a local run.

Ranks (`torchrun --nproc-per-node N -m btrm.cli score ...`, `deepspeed --num_gpus N ...`): the input is cut into
chunks of --chunk-rows rows, numbered from the first row the output does not hold yet, and rank r scores chunks
r, r+N, r+2N, ... Round-robin by chunk rather than by byte range: a chunk of thousands of rows holds about the
same mix of long and short conversations wherever it sits, so the ranks stay balanced even when lengths are
long-tailed or sorted (a byte range of a source sorted by length, or a concatenation of sources, would not);
every rank reads the input (any format, no seek), which costs far less than scoring it; and each chunk is packed
exactly as a one-process run packs it, so the output is byte-identical for any number of ranks.
Rank r writes `<output>.parts/part-r-of-N.cC.jsonl` and resumes it on its own (a torn trailing chunk is cut and
rescored); when every rank is done (a gloo barrier, no time limit), rank 0 appends the parts to the output in input
order and removes them. Several nodes need the output's folder on a shared file system.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path


@dataclass(frozen=True)
class Shard:
    """Rows rank `rank` of `world` scores: chunks of `chunk` rows counted from row `base`, dealt round robin."""

    rank: int = 0
    world: int = 1
    chunk: int = 1
    base: int = 0

    def index(self, row: int) -> int | None:
        """Position of input row `row` in this shard, or None when another rank (or the output already) has it."""
        r = row - self.base
        c, offset = divmod(r, self.chunk)
        if r < 0 or c % self.world != self.rank:
            return None
        return (c // self.world) * self.chunk + offset

    def row(self, k: int) -> int:
        """Input row of this shard's k-th row."""
        j, offset = divmod(k, self.chunk)
        return self.base + (j * self.world + self.rank) * self.chunk + offset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", nargs="+", metavar="URL", help="score on running SGLang / vLLM / `btrm serve` servers "
                   "of the --model checkpoint (which then only renders and tokenizes, as local scoring does)")
    p.add_argument("--backend", default="auto", choices=["auto", "sglang", "vllm"],
                   help="with --server: /classify (sglang, btrm serve) or /pooling (vllm); auto asks the first server")
    p.add_argument("--server-batch-size", type=int, default=64, help="with --server: conversations per request")
    p.add_argument("--server-concurrency", type=int, default=4, help="with --server: requests in flight per server")


def launcher_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, deepspeed); (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def load_model(args: argparse.Namespace):
    """The local RewardModel, or with --server the checkpoint's tokenizer in front of the servers."""
    from btrm.inference.scorer import load_in_owned_process

    if args.server:
        from btrm.inference.remote import remote_reward_model
        from btrm.inference.cli_score import Stop

        if args.truncation != "error":
            raise Stop("--truncation left cuts token ids, which servers do not take: score over-long rows locally, "
                       "or drop --truncation")
        return remote_reward_model(args.server, args.model, args.backend, args.max_length, args.chat_template_kwargs,
                                   args.trust_remote_code, batch_size=args.server_batch_size,
                                   concurrency=args.server_concurrency)
    return load_in_owned_process(args.model, device=args.device, dtype=args.dtype,
                                 attn_implementation=args.attn_implementation, max_length=args.max_length,
                                 chat_template_kwargs=args.chat_template_kwargs, batch_tokens=args.batch_tokens,
                                 truncation=args.truncation, trust_remote_code=args.trust_remote_code,
                                 share_prompt=not args.no_share_prompt)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def score_ranks(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> int:
    """This rank's shard into its part file; then rank 0 merges the parts into --output."""
    import torch
    import torch.distributed as dist

    from btrm.inference.cli_score import Stop, Tally, read_done, score_rows

    if args.server:
        raise Stop("--server runs in one process (it keeps every server busy itself): drop the launcher")
    out = Path(args.output)
    if args.overwrite:
        raise Stop("--overwrite under a launcher: delete the output and its .parts folder instead")
    if args.device in (None, "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("gloo", timeout=timedelta(days=30))  # barriers only; scoring a shard may take days
    try:
        base = read_done(out, Tally())  # rows a one-process run (or an earlier merge) already wrote
        shard = Shard(rank, world, args.chunk_rows, base)
        folder = parts_dir(out)
        name = f"part-{rank:05d}-of-{world:05d}.c{args.chunk_rows}"
        part, finished = folder / f"{name}.jsonl", folder / f"{name}.done"
        folder.mkdir(parents=True, exist_ok=True)
        others = sorted(p.name for p in folder.glob("part-*.jsonl") if not p.name.endswith(
            f"-of-{world:05d}.c{args.chunk_rows}.jsonl"))
        if others:
            raise Stop(f"{folder} holds {others[0]}: parts of a run with another number of ranks or --chunk-rows; "
                       "re-run with those, or delete the folder to rescore")
        if not finished.exists():
            cut_torn_chunk(part, args.chunk_rows)
        rc = score_rows(args, shard, part)
        if rc:
            return rc
        finished.touch()
        dist.barrier()
        if rank == 0:
            merge(out, [folder / f"part-{r:05d}-of-{world:05d}.c{args.chunk_rows}.jsonl" for r in range(world)],
                  base, args.chunk_rows)
            shutil.rmtree(folder)
            tally = Tally()
            read_done(out, tally)
            print(f"btrm score: merged {world} parts into {out}\n{tally.report()}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def cut_torn_chunk(part: Path, chunk: int) -> None:
    """Keep whole chunks only: rows of a chunk cut short by a kill are rescored with their chunk, so it packs (and
    scores, to the bit) exactly as a one-process run."""
    if not part.exists():
        return
    with part.open("rb+") as f:
        data = f.read()
        lines = data.count(b"\n")
        keep = lines - lines % chunk
        if keep < lines or not data.endswith(b"\n"):
            end = 0
            for _ in range(keep):
                end = data.index(b"\n", end) + 1
            f.truncate(end)
            print(f"btrm score: {part.name}: {lines - keep} rows of a torn chunk will be rescored", file=sys.stderr)


def merge(out: Path, parts: list[Path], base: int, chunk: int) -> None:
    """Output rows (its first `base` lines) then the parts' chunks in turn, written aside and renamed over it."""
    tmp = out.with_name(f".{out.name}.merging")
    readers = [p.open("rb") for p in parts]
    try:
        with tmp.open("wb") as w:
            if base:
                with out.open("rb") as f:
                    shutil.copyfileobj(f, w)
            row, c = base, 0
            while True:
                lines = []
                for _ in range(chunk):
                    line = readers[c % len(readers)].readline()
                    if not line:
                        break
                    if not line.startswith(b'{"row": %d,' % row):
                        raise RuntimeError(f"{parts[c % len(readers)]}: expected row {row} next, got {line[:40]!r}")
                    lines.append(line)
                    row += 1
                w.writelines(lines)
                if len(lines) < chunk:
                    break
                c += 1
            left = [p for p, f in zip(parts, readers) if f.read(1)]
            if left:
                raise RuntimeError(f"{left[0]} has rows after the input's last chunk")
    finally:
        for f in readers:
            f.close()
    os.replace(tmp, out)
