"""`btrm data {stats,clean,dedup,decontaminate,swap,filter}`: inspect and curate preference data.

Sources are given as in training, either `--config recipe.yaml` (its data.sources) or `--source PATH` (repeatable;
`--format` and `--swap` apply to each). Inputs are never modified; see btrm.data.curate for what each step does.

  btrm data stats --config configs/skywork-reward-v2/qwen3-8b.yaml --output reports/80k.json   (+ reports/80k.png)
  btrm data clean --source raw.jsonl --output clean.parquet                (+ clean.report.json)
  btrm data dedup --source a.parquet --source b.jsonl --output dedup.parquet
  btrm data decontaminate --source dedup.parquet --benchmark-prompts rb2.jsonl ppe.parquet --output final.parquet
  btrm data swap --source discarded.parquet --output recycled.parquet
  btrm data filter --source final.parquet --model CKPT --max-disagreement 2 --output filtered.parquet
  btrm data filter --source final.parquet --server http://h1:30000 http://h2:30000 --tokenizer CKPT \
      --margin-band -1 8 --flag --output flagged.parquet                  (+ flagged.scores.jsonl)
Every step takes --num-proc N (default: all cores, at most 16) and writes the same output for any N.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from btrm.config import DataConfig, ModelConfig, SourceConfig, field_choices, load_config
from btrm.data import curate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="recipe YAML: read its data.sources (and, for stats, model and data limits)")
    src.add_argument("--source", action="append", metavar="PATH",
                     help="json/jsonl/parquet/arrow file, directory or Hub dataset id (repeatable)")
    common.add_argument("--format", default="auto", choices=field_choices(SourceConfig, "format"),
                        help="row layout of the --source inputs (default: detected per row)")
    common.add_argument("--swap", action="store_true", help="read the --source inputs with chosen/rejected exchanged")
    common.add_argument("--strict", action="store_true", help="stop at the first invalid row instead of counting it")
    common.add_argument("--output", required=True,
                        help="dataset to write (.jsonl or .parquet; report: <stem>.report.json); "
                             "for stats the report (.json; histogram: <stem>.png)")
    common.add_argument("--num-proc", type=int, default=min(len(os.sched_getaffinity(0)), 16),
                        help="worker processes that parse, validate and do the per-pair work (default: all cores, "
                             "at most 16: the main process caps a run near 100k pairs/s; the output is the same "
                             "for any value)")

    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = sub.add_parser("stats", parents=[common], help="counts and token-length percentiles, with a PNG histogram")
    p.add_argument("--tokenizer", help="tokenizer path or Hub id (default: the config's model)")
    p.add_argument("--max-length", type=int, help="over-long threshold per conversation (default: the config's)")
    p.add_argument("--max-tokens", type=int, help="over-long threshold per pair (default: the config's)")
    p.add_argument("--chat-template-kwargs", type=yaml.safe_load,
                   help='YAML mapping for apply_chat_template, e.g. \'{date_string: "26 Jul 2024"}\' '
                        "(default: the config's data.chat_template_kwargs)")
    sub.add_parser("clean", parents=[common], help="drop rows with missing or empty responses (and other invalid rows)")
    sub.add_parser("dedup", parents=[common], help="drop exact duplicates of (history, chosen, rejected) across sources")
    p = sub.add_parser("decontaminate", parents=[common], help="drop pairs sharing an n-gram with a benchmark prompt")
    p.add_argument("--benchmark-prompts", nargs="+", required=True, metavar="FILE",
                   help="json/jsonl/parquet files with a prompt, question or conversation_input field")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in words (default 13)")
    sub.add_parser("swap", parents=[common], help="exchange chosen and rejected")
    p = sub.add_parser("filter", parents=[common],
                       help="score both sides with a reward model; remove (or --flag) pairs it contradicts")
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", metavar="CKPT", help="local reward-model checkpoint")
    scorer.add_argument("--server", nargs="+", metavar="URL",
                        help="running SGLang / vLLM / btrm serve servers (needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="CKPT",
                   help="with --server: the checkpoint whose tokenizer and chat_template_kwargs render the pairs")
    p.add_argument("--backend", default="sglang", choices=["sglang", "vllm"],
                   help="with --server: /classify (sglang, btrm serve) or /pooling (vllm)")
    p.add_argument("--device", help="with --model: torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-disagreement", type=float, metavar="D",
                   help="remove pairs with reward(chosen) - reward(rejected) < -D")
    p.add_argument("--margin-band", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="keep only pairs with LOW <= reward(chosen) - reward(rejected) <= HIGH")
    p.add_argument("--flag", action="store_true",
                   help="keep every pair; count the verdicts under 'flagged' (rewards: <stem>.scores.jsonl)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as e:  # config errors, bad rows under --strict, missing files, Hub unreachable
        print(f"btrm data {args.data_command}: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_config(args.config, validate=False)
        sources, data, model = cfg.data.sources, cfg.data, cfg.model
        if not sources:
            print(f"{args.config}: data.sources is empty", file=sys.stderr)
            return 2
    else:
        sources = [SourceConfig(path=p, format=args.format, swap=args.swap) for p in args.source]
        data, model = DataConfig(), ModelConfig()
    options = {}
    if args.data_command == "stats":
        from transformers import AutoTokenizer

        name = args.tokenizer or model.name_or_path
        if not name:
            print("stats needs --tokenizer (or a --config with model.name_or_path)", file=sys.stderr)
            return 2
        options = dict(tokenizer=AutoTokenizer.from_pretrained(name, trust_remote_code=model.trust_remote_code),
                       chat_template_kwargs=args.chat_template_kwargs or data.chat_template_kwargs,
                       max_length=args.max_length or data.max_length, max_tokens=args.max_tokens or data.max_tokens)
    elif args.data_command == "decontaminate":
        options = dict(benchmark_files=args.benchmark_prompts, ngram=args.ngram)
    elif args.data_command == "filter":
        from btrm.data import rm_filter

        rule = rm_filter.FilterRule(args.max_disagreement, tuple(args.margin_band) if args.margin_band else None,
                                    args.flag)
        if args.server:
            if not args.tokenizer:
                print("filter --server needs --tokenizer CKPT (the checkpoint the servers run)", file=sys.stderr)
                return 2
            score, info = rm_filter.remote_scorer(args.server, args.tokenizer, args.backend)
        else:
            if args.tokenizer:
                print("filter: --tokenizer is for --server; --model renders with its own tokenizer", file=sys.stderr)
                return 2
            score, info = rm_filter.local_scorer(args.model, args.device)
        options = dict(score=score, scorer_info=info, rule=rule)
    report = curate.run_command(args.data_command, sources, args.output, strict=args.strict,
                                num_proc=args.num_proc, **options)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    lines = [f"{report['command']}: {report['totals']['read']:,} rows read, {report['totals']['kept']:,} kept, "
             f"{report['totals']['removed']:,} removed"]
    for src, n in report["read"].items():
        removed = report["removed"].get(src, {})
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(removed.items()))
        lines.append(f"  {src}: read {n:,}, kept {report['kept'][src]:,}" + (f"; removed: {why}" if why else ""))
    if report.get("flagged"):
        lines.append("  flagged (kept): " + "; ".join(
            f"{src}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(c.items())) for src, c in report["flagged"].items()))
    if report["command"] == "stats":
        for key in ("conversation_tokens", "pair_tokens"):
            s = report[key]
            if s.get("count"):
                lines.append(f"  {key}: p50 {s['p50']:,.0f}  p90 {s['p90']:,.0f}  p99 {s['p99']:,.0f}  "
                             f"max {s['max']:,}  mean {s['mean']:,.1f}")
        lines.append(f"  pairs over max_length {report['max_length']:,}: {report['share_pairs_over_max_length']:.2%}; "
                     f"over max_tokens {report['max_tokens']:,}: {report['share_pairs_over_max_tokens']:.2%}")
        lines.append(f"  histogram: {report['histogram']}")
        if report["pair_tokens"].get("count"):
            lines.append(f"  for `btrm plan`: --dataset-pairs {report['totals']['kept']} "
                         f"--mean-pair-tokens {report['pair_tokens']['mean']:.0f}")
    else:
        lines.append(f"  wrote {report['output']}")
    lines.append(f"  report: {curate.report_path(report['output'])}")
    return "\n".join(lines)

