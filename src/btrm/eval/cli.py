"""`btrm eval`: score a reward model on the seven benchmarks of the Skywork-Reward-V2 model card.

  btrm eval --model PATH --benchmark NAME [--data PATH_OR_HUB_ID] [--output-dir DIR] [--max-length N]
  btrm eval --model PATH --suite all --data-dir DIR [--output-dir DIR] ...
  btrm eval --recompute OUT/NAME.rows.jsonl [...]          results from saved per-row scores, no model

--data-dir holds one entry per benchmark, named NAME or NAME.{json,jsonl,parquet} (a missing one leaves its
column '-'), in each benchmark's own schema; a folder means every json/jsonl/parquet file in it, so keep one
split per folder:
  rewardbench       allenai/reward-bench (split filtered): prompt, chosen, rejected, subset, id
  rewardbench2      allenai/reward-bench-2 (split test): id, prompt, chosen[], rejected[], subset
  ppe-preference    lmarena-ai/PPE-Human-Preference-V1 (split test): prompt, response_1, response_2, winner
  ppe-correctness/  a folder, one file or subfolder per set (its name names the set: mmlu-pro.jsonl, math/...)
                    from lmarena-ai/PPE-{MMLU-Pro,MATH,GPQA,IFEval,MBPP-Plus}-Best-of-K (split train)
  rmb/              the RMB repository's RMB_dataset folder (Pairwise_set/..., BoN_set/...)
  rm-bench          THU-KEG/RM-Bench: id, prompt, chosen[3], rejected[3], domain
  judgebench        ScalerLab/JudgeBench (split gpt): pair_id, question, response_A, response_B, label, source
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from btrm.eval.benchmarks import BENCHMARKS
from btrm.eval.harness import POLICIES, evaluate, evaluate_suite, find_data, markdown_table, recompute


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--benchmark", choices=list(BENCHMARKS), help="one benchmark")
    what.add_argument("--suite", choices=["all"], help="every benchmark found in --data-dir, in card order")
    what.add_argument("--recompute", nargs="+", metavar="ROWS_JSONL", help="results from saved per-row files")
    p.add_argument("--model", help="checkpoint directory or Hub id (btrm.RewardModel.from_pretrained)")
    p.add_argument("--model-name", help="name in the table and result files (default: last part of --model)")
    p.add_argument("--data", help="data of --benchmark: a local file/folder in its schema, or a Hub id (default: its)")
    p.add_argument("--data-dir", help="folder with one entry per benchmark (layout above)")
    p.add_argument("--output-dir", help="default: eval_results/<model name>")
    p.add_argument("--max-length", type=int,
                   help="tokens; longer conversations are counted and handled by --over-length "
                        "(default: the checkpoint's max_length, 16384 when it records none)")
    p.add_argument("--over-length", choices=POLICIES, default="score",
                   help="score: give them to the model, which cuts the prompt from the left (and fails when the "
                        "last turn alone is too long); skip: leave their rows out of the results (default score)")
    p.add_argument("--batch-tokens", type=int, help="tokens packed into one forward (RewardModel default: 16384)")
    p.add_argument("--device", help="passed to RewardModel.from_pretrained (default: its own)")
    p.add_argument("--dtype", help="passed to RewardModel.from_pretrained (default: its own)")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="encode every conversation whole (default: a prompt shared by a row's responses is encoded "
                        "once; the scores are the same)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.recompute:
        return _recompute(args.recompute)
    if not args.model:
        raise SystemExit("btrm eval: --model is required (except with --recompute)")
    if args.suite and not args.data_dir:
        raise SystemExit("btrm eval: --suite all needs --data-dir")
    return _evaluate(args, *load_scorer(args))


def load_scorer(args: argparse.Namespace):
    """(score_fn, length_fn, max_length) of the checkpoint. Imported here: torch and transformers load only now."""
    from btrm import RewardModel
    from btrm.cpu import retain_freed_memory
    from btrm.render import render_ids

    options = dict(device=args.device, dtype=args.dtype, max_length=args.max_length, batch_tokens=args.batch_tokens)
    model = RewardModel.from_pretrained(
        args.model,
        # under "score" the model gets over-long conversations: cut their prompt from the left, as RewardBench does
        truncation="left" if args.over_length == "score" else "error",
        share_prompt=not args.no_share_prompt,
        **{k: v for k, v in options.items() if v is not None},
    )
    retain_freed_memory(model.device)  # CPU: no page-faulting every batch's activations in again (btrm.cpu)

    def length_fn(conversation):  # rendered exactly as RewardModel.score renders it
        return len(render_ids(model.tokenizer, conversation, model.chat_template_kwargs))

    def score_fn(conversations):
        before = dict(model.token_counts)
        rewards = model.score(conversations)
        logging.getLogger("btrm.eval").info("scored %d conversations: %s", len(conversations),
                                            model.token_report(since=before))
        return rewards

    return score_fn, length_fn, model.max_length


def _evaluate(args: argparse.Namespace, score_fn, length_fn, max_length: int) -> int:
    model_name = args.model_name or Path(args.model).name
    out_dir = Path(args.output_dir or Path("eval_results") / model_name)
    kwargs = dict(model_name=model_name, max_length=max_length, length_fn=length_fn, over_length=args.over_length)
    if args.suite:
        all_results = evaluate_suite(score_fn, args.data_dir, out_dir, **kwargs)
    else:
        data = args.data
        if data is None and args.data_dir:
            found = find_data(args.data_dir, args.benchmark)
            if found is None:
                raise SystemExit(f"btrm eval: no {args.benchmark} data in {args.data_dir}")
            data = str(found)
        all_results = {args.benchmark: evaluate(score_fn, args.benchmark, data, out_dir, **kwargs)}
    _print(all_results, model_name)
    print(f"(results in {out_dir})", file=sys.stderr)
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
        print(f"{r['column']}: {r['overall']:.2f}  ({c['rows']} rows, {c['rows_skipped']} skipped; {c['over_length']} "
              f"conversations over max_length={c['max_length']}, policy {c['over_length_policy']})")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r["subsets"].items()))
        for note in r["notes"]:
            print(f"  note: {note}")
    print()
    print(markdown_table(model_name, {name: r["overall"] for name, r in all_results.items()}), end="")
