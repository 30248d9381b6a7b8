"""`btrm eval`: score a reward model on the seven benchmarks of the Skywork-Reward-V2 model card.

  btrm eval --model PATH --benchmark NAME [--data PATH_OR_HUB_ID] [--output-dir DIR] [--max-length N]
  btrm eval --model PATH --suite all [--data-dir DIR]      every benchmark (from the Hub without --data-dir)
  btrm eval --fetch DIR                                      download the Hub benchmarks into the --data-dir layout
  btrm eval --recompute OUT/NAME.rows.jsonl [...]          results from saved per-row scores, no model

Length: conversations are scored up to --max-length tokens, by default the model's usable length
min(max_position_embeddings, 16384) (the length the model card evaluates at), not the training length, which is
shown. Longer ones follow --over-length: truncate (default) cuts the prompt from the left and skips, counting
them, the rows whose last turn alone is too long; skip leaves out every row with a conversation over the limit;
error stops at the first. The counts are printed with each result.

--data-dir holds one entry per benchmark, named NAME or NAME.{json,jsonl,parquet} (a missing one leaves its
column '-'), in each benchmark's own schema; a folder means every json/jsonl/parquet file in it, so keep one
split per folder (`--fetch DIR` writes this layout for everything on the Hub):
  rewardbench       allenai/reward-bench (split filtered): prompt, chosen, rejected, subset, id
  rewardbench2      allenai/reward-bench-2 (split test): id, prompt, chosen[], rejected[], num_correct, subset
  ppe-preference    lmarena-ai/PPE-Human-Preference-V1 (split test): prompt, response_1, response_2, winner
  ppe-correctness/  a folder, one file or subfolder per set (its name names the set: mmlu-pro.jsonl, math/...)
                    from lmarena-ai/PPE-{MMLU-Pro,MATH,GPQA,IFEval,MBPP-Plus}-Best-of-K (split train)
  rmb/              the RMB repository's RMB_dataset folder (Pairwise_set/..., BoN_set/...): GitHub only,
                    https://github.com/Zhou-Zoey/RMB-Reward-Model-Benchmark
  rm-bench/         THU-KEG/RM-Bench's data/ folder: {chat,code,math,safety-refuse,safety-response}_filtered.json
                    (domain = file name) or total_dataset.json (id, prompt, chosen[3], rejected[3], domain)
  judgebench        ScalerLab/JudgeBench (split gpt): pair_id, question, response_A, response_B, label, source
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from btrm import attention
from btrm.errors import UserError
from btrm.eval.benchmarks import BENCHMARKS
from btrm.eval.harness import (POLICIES, evaluate, fetch, find_data, hub_failure, load_benchmark, load_suite,
                               markdown_table, recompute)
from btrm.eval.io import HubUnavailable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--benchmark", choices=list(BENCHMARKS), help="one benchmark")
    what.add_argument("--suite", choices=["all"], help="every benchmark, in card order: those in --data-dir, or "
                                                       "from the Hub without it")
    what.add_argument("--fetch", metavar="DIR", help="download every Hub benchmark into DIR (--data-dir layout)")
    what.add_argument("--recompute", nargs="+", metavar="ROWS_JSONL", help="results from saved per-row files")
    p.add_argument("--model", help="checkpoint directory or Hub id (btrm.RewardModel.from_pretrained)")
    p.add_argument("--model-name", help="name in the table and result files (default: last part of --model)")
    p.add_argument("--data", help="data of --benchmark: a local file/folder in its schema, or a Hub id (default: its)")
    p.add_argument("--data-dir", help="folder with one entry per benchmark (layout above)")
    p.add_argument("--output-dir", help="default: eval_results/<model name>")
    p.add_argument("--max-length", type=int,
                   help="tokens per conversation (default: min(max_position_embeddings, 16384), not the training "
                        "length); longer ones follow --over-length")
    p.add_argument("--over-length", choices=POLICIES, default="truncate",
                   help="truncate: cut the prompt from the left, skip (and count) rows whose last turn alone is too "
                        "long; skip: skip (and count) every row with a conversation over the limit; error: stop "
                        "(default truncate)")
    p.add_argument("--batch-tokens", type=int, help="tokens packed into one forward (RewardModel default: 16384)")
    p.add_argument("--device", help="passed to RewardModel.from_pretrained (default: its own)")
    p.add_argument("--dtype", help="passed to RewardModel.from_pretrained (default: its own)")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="encode every conversation whole (default: a prompt shared by a row's responses is encoded "
                        "once; the scores are the same)")
    p.add_argument("--attn-implementation", choices=attention.CHOICES, help=attention.help_text())
    p.add_argument("--server", nargs="+", metavar="URL", help="score on running SGLang / vLLM / `btrm serve` servers "
                   "of the --model checkpoint, which renders and tokenizes as local scoring does (over-long "
                   "conversations: --over-length skip, or error; the prompt is cut only locally)")
    p.add_argument("--backend", default="auto", choices=["auto", "sglang", "vllm"],
                   help="with --server: /classify (sglang, btrm serve) or /pooling (vllm); auto asks the first server")
    p.add_argument("--update-card", metavar="CKPT", help="write the benchmark table into the model card (README.md) "
                   "of checkpoint directory CKPT (kept in CKPT/btrm_eval.json)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.recompute:
        return _recompute(args.recompute)
    if args.fetch:
        for name, path in fetch(args.fetch).items():
            print(f"{name}: {path}")
        print(f"btrm eval: fetched into {args.fetch}; RMB is on GitHub only (see `btrm eval --help`); "
              f"now run btrm eval --model PATH --suite all --data-dir {args.fetch}", file=sys.stderr)
        return 0
    if not args.model:
        raise UserError("--model is required (except with --recompute or --fetch)")
    records = _load_data(args)  # before the model: a data mistake costs no model load
    return _evaluate(args, records, *load_scorer(args))


def _load_data(args: argparse.Namespace) -> dict[str, list[dict]]:
    if args.suite:
        return load_suite(args.data_dir)
    data = args.data
    if data is None and args.data_dir:
        found = find_data(args.data_dir, args.benchmark)
        if found is None:
            raise UserError(f"--data-dir {args.data_dir}: no {args.benchmark} or {args.benchmark}.{{json,jsonl,"
                            f"parquet}} inside")
        data = str(found)
    try:
        return {args.benchmark: load_benchmark(args.benchmark, data)}
    except HubUnavailable as e:
        raise UserError(hub_failure({args.benchmark: e}) if data is None else f"--data {data}: {e}") from e


def load_scorer(args: argparse.Namespace):
    """(score_fn, length_fn, cut_length_fn, max_length) of the checkpoint. Imported here: torch and transformers
    load only now."""
    from btrm.inference.scorer import load_in_owned_process
    from btrm.render import render_ids

    options = dict(device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                   max_length=args.max_length, batch_tokens=args.batch_tokens)
    if args.server:
        from btrm.inference.remote import remote_reward_model

        model = remote_reward_model(args.server, args.model, args.backend, args.max_length)
    else:
        model = load_in_owned_process(
            args.model,
            # under "truncate" the model gets over-long conversations: it cuts their prompt from the left
            truncation="left" if args.over_length == "truncate" else "error",
            share_prompt=not args.no_share_prompt,
            **{k: v for k, v in options.items() if v is not None},
        )
    print(model.length_note())

    def length_fn(conversation):  # rendered exactly as RewardModel.score renders it
        return len(render_ids(model.tokenizer, conversation, model.chat_template_kwargs))

    def score_fn(conversations):
        before = dict(model.token_counts)
        rewards = model.score(conversations)
        logging.getLogger("btrm.eval").info("scored %d conversations: %s", len(conversations),
                                            model.token_report(since=before))
        return rewards

    return score_fn, length_fn, model.cut_length, model.max_length


def _evaluate(args: argparse.Namespace, records: dict[str, list[dict]], score_fn, length_fn, cut_length_fn,
              max_length: int) -> int:
    model_name = args.model_name or Path(args.model).name
    out_dir = Path(args.output_dir or Path("eval_results") / model_name)
    kwargs = dict(model_name=model_name, max_length=max_length, length_fn=length_fn, cut_length_fn=cut_length_fn,
                  over_length=args.over_length)
    all_results = {name: evaluate(score_fn, name, rows, out_dir, **kwargs) for name, rows in records.items()}
    _print(all_results, model_name)
    if args.update_card:
        from btrm.card import store_eval

        table = markdown_table(model_name, {name: r["overall"] for name, r in all_results.items()})
        card = store_eval(args.update_card, table, {n: r["overall"] for n, r in all_results.items()}, max_length)
        print(f"btrm eval: benchmark table written into {card}", file=sys.stderr)
    print(f"(results in {out_dir}: NAME.results.json, per-row scores NAME.rows.jsonl, table.md)", file=sys.stderr)
    return 0


def _recompute(files: list[str]) -> int:
    all_results = {}
    for f in files:
        r = recompute(f)
        all_results[r["benchmark"]] = r
    models = {r["model"] for r in all_results.values()}
    _print(all_results, " / ".join(sorted(models)))
    return 0


def _print(all_results: dict[str, dict], model_name: str) -> None:
    for r in all_results.values():
        c = r["counts"]
        over = f"{c['over_length']} conversations over max_length {c['max_length']}"
        if c.get("truncated"):
            over += f", {c['truncated']} of them cut from the left"
        print(f"{r['column']}: {r['overall']:.2f}  ({c['rows']} rows, {c['rows_skipped']} skipped; {over}; "
              f"policy {c['over_length_policy']})")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r["subsets"].items()))
        for note in r["notes"]:
            print(f"  note: {note}")
    print()
    print(markdown_table(model_name, {name: r["overall"] for name, r in all_results.items()}), end="")
