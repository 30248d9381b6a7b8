"""`btrm data`: curation steps on small fixture files, through the real command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from btrm.cli import main
from btrm.config import SourceConfig
from btrm.data.curate import run_command, words
from btrm.data.sources import DataReport, load_pairs


def conv(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def row(user: str, good: str, bad: str, **extra) -> dict:
    return {"chosen": conv(user, good), "rejected": conv(user, bad), **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def btrm(*args) -> int:
    return main(["data", *map(str, args)])


def read_back(path: Path) -> list:
    return load_pairs([SourceConfig(path=str(path))], DataReport(), strict=True)


def check_accounting(report: dict, output_rows: int | None = None) -> None:
    """Every row read is either kept or removed for a counted reason."""
    for src, n in report["read"].items():
        assert n == report["kept"][src] + sum(report["removed"].get(src, {}).values()), src
    assert report["totals"]["read"] == report["totals"]["kept"] + report["totals"]["removed"]
    if output_rows is not None:
        assert output_rows == report["totals"]["kept"]


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [
        row("What is 2 + 2?", "4", "5"),
        row("Name a colour.", "Blue.", "Seven."),
        row("Say hi.", "Hi!", "No."),
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        row("  What is 2 +   2? ", "4\n", "5"),        # a[0] up to whitespace: duplicate
        row("Name a colour.", "blue.", "Seven."),      # differs by case only: kept
        row("Say hi.", "Hi!", "No."),                  # exact duplicate of a[2]
        row("Count to three.", "1 2 3", "3 2 1"),
        row("Count to three.", "1 2 3", "3 2 1"),      # duplicate within b
    ])
    return a, b


def test_dedup_across_sources(two_sources, tmp_path):
    a, b = two_sources
    before = {p: digest(p) for p in (a, b)}
    out = tmp_path / "out" / "dedup.parquet"
    assert btrm("dedup", "--source", a, "--source", b, "--output", out) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["removed"] == {"b": {"duplicate": 3}}
    assert report["duplicate_of"] == {"b": {"a": 2, "b": 1}}
    kept = read_back(out)
    check_accounting(report, len(kept))
    assert [p.chosen[-1]["content"] for p in kept] == ["4", "Blue.", "Hi!", "blue.", "1 2 3"]
    assert {p: digest(p) for p in (a, b)} == before


def test_clean_counts_every_invalid_row(tmp_path):
    src = write_jsonl(tmp_path / "raw.jsonl", [
        row("q1", "fine", "also fine"),
        {"chosen": conv("q2", "a")},                                    # rejected missing
        {"chosen": conv("q3", "a"), "rejected": None},                  # rejected null
        row("q4", "   \n\t", "x"),                                      # whitespace-only response
        row("q5", "", "x"),                                             # empty response
        {"prompt": "q6", "chosen": "good", "rejected": "bad"},          # strings layout: valid
    ])
    before = digest(src)
    out = tmp_path / "clean.jsonl"
    assert btrm("clean", "--source", src, "--output", out) == 0
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["removed"] == {"raw": {"missing_field": 1, "null_field": 1, "empty_response": 2}}
    assert report["invalid_rows"] == report["removed"]
    kept = read_back(out)
    check_accounting(report, len(kept))
    assert [p.prompt[0]["content"] for p in kept] == ["q1", "q6"]
    assert digest(src) == before


def test_decontaminate_13_vs_12_words(tmp_path):
    bench_words = [f"w{i}" for i in range(30)]
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"prompt": " ".join(bench_words)},
        {"question": "short one"},                                       # < 13 words: cannot match
        {"conversation_input": [{"role": "user", "content": "x " * 3}]},
        {"id": 7},                                                       # no prompt field
    ])
    # 13 shared words, with case and punctuation that normalisation removes
    hit13 = "Please: " + " ".join(w.upper() + "," for w in bench_words[5:18]) + " thanks"
    hit12 = "Please " + " ".join(bench_words[5:17]) + " thanks"
    split = " ".join(bench_words[0:10]) + " BREAK " + " ".join(bench_words[10:20])  # 10 + 10 words
    src = write_jsonl(tmp_path / "train.jsonl", [
        row(hit13, "a", "b"), row(hit12, "a", "b"), row(split, "a", "b"),
        # the n-gram in an answer, not a user turn: kept
        row("unrelated", " ".join(bench_words), "b"),
    ])
    before = digest(src), digest(bench)
    out = tmp_path / "clean.parquet"
    assert btrm("decontaminate", "--source", src, "--benchmark-prompts", bench, "--output", out) == 0
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["removed"] == {"train": {"contaminated": 1}}
    assert report["contaminated_examples"][0]["ngram"] == " ".join(bench_words[5:18])
    assert report["benchmarks"][str(bench)] == {"rows": 4, "prompt_texts": 3, "shorter_than_n": 2,
                                                "no_prompt_field": 1, "pairs_matched": 1}
    kept = read_back(out)
    check_accounting(report, len(kept))
    assert [p.prompt[0]["content"] for p in kept] == [hit12, split, "unrelated"]
    assert (digest(src), digest(bench)) == before


def test_words_normalisation():
    assert words("  Hello,   WORLD!  it's  -- 3.5 ") == ["hello", "world", "its", "35"]


def test_swap_round_trip(two_sources, tmp_path):
    a, _ = two_sources
    out = tmp_path / "swapped.jsonl"
    report = run_command("swap", [SourceConfig(path=str(a))], out)
    check_accounting(report, 3)
    orig, swapped = read_back(a), read_back(out)
    assert [p.chosen for p in swapped] == [p.rejected for p in orig]
    assert [p.rejected for p in swapped] == [p.chosen for p in orig]
    back = tmp_path / "back.jsonl"
    assert btrm("swap", "--source", out, "--output", back) == 0
    assert [p.chosen for p in read_back(back)] == [p.chosen for p in orig]
    # --swap is the source-spec flag (as `swap: true` in a recipe): the step swaps what training would read
    same = tmp_path / "same.jsonl"
    assert btrm("swap", "--source", a, "--swap", "--output", same) == 0
    assert [p.chosen for p in read_back(same)] == [p.chosen for p in orig]


def test_config_sources_and_refusing_to_overwrite_inputs(two_sources, tmp_path):
    a, b = two_sources
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: x}}\ndata:\n  sources:\n    - {{path: {a}}}\n"
                      f"    - {{path: {b}, name: second, swap: true}}\n")
    out = tmp_path / "all.jsonl"
    assert btrm("clean", "--config", recipe, "--output", out) == 0
    report = json.loads((tmp_path / "all.report.json").read_text())
    assert report["kept"] == {"a": 3, "second": 5}
    assert read_back(out)[3].chosen[-1]["content"] == "5"  # b's first pair, swapped by its source spec
    with pytest.raises(ValueError, match="is one of the inputs"):
        run_command("clean", [SourceConfig(path=str(a))], a)


def test_stats_writes_png_and_lengths(two_sources, tmp_path):
    from btrm.render import render_ids
    from btrm.tiny import build_tokenizer

    tok_dir = tmp_path / "tok"
    tok = build_tokenizer("llama3.2")
    tok.save_pretrained(tok_dir)
    a, b = two_sources
    before = digest(a), digest(b)
    out = tmp_path / "stats" / "s.json"
    assert btrm("stats", "--source", a, "--source", b, "--tokenizer", tok_dir, "--max-length", 40,
                "--chat-template-kwargs", "{date_string: 26 Jul 2024}", "--output", out) == 0
    report = json.loads(out.read_text())
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_accounting(report)
    assert report["read"] == {"a": 3, "b": 5}
    lens = [len(render_ids(tok, c, {"date_string": "26 Jul 2024"}))
            for p in read_back(a) + read_back(b) for c in (p.chosen, p.rejected)]
    assert report["conversation_tokens"]["max"] == max(lens)
    assert report["pair_tokens"]["count"] == 8
    assert report["share_conversations_over_max_length"] == pytest.approx(sum(x > 40 for x in lens) / len(lens))
    assert (digest(a), digest(b)) == before


@pytest.mark.parametrize("command", ["clean", "dedup", "decontaminate", "stats", "swap"])
def test_num_proc_gives_identical_output(two_sources, tmp_path, monkeypatch, command):
    """Chunks of 2 rows spread over 1, 2 and 3 workers: same output bytes and report (incl. invalid-row counts
    and the first example of each reason, which depend on input order)."""
    from btrm.data import curate
    from btrm.tiny import build_tokenizer

    monkeypatch.setattr(curate, "CHUNK_ROWS", 2)
    a, b = two_sources
    bad = write_jsonl(tmp_path / "bad.jsonl", [row("q", "", "x"), {"chosen": conv("q", "a")}, row("q", "a", "b"),
                                               row("Say hi.", "Hi!", "No."), row("q", "", "y")])
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"prompt": "what is 2 2"}, {"prompt": "count to three"}])
    options = {"decontaminate": dict(benchmark_files=[str(bench)], ngram=2),
               "stats": dict(tokenizer=build_tokenizer("llama3"), max_length=20)}.get(command, {})
    sources = [SourceConfig(path=str(p)) for p in (a, bad, b)]
    outputs = []
    for n in (1, 2, 3):
        out = tmp_path / f"n{n}" / ("s.json" if command == "stats" else "out.jsonl")
        report = run_command(command, sources, out, num_proc=n, **options)
        check_accounting(report)
        report.pop("output"), report.pop("histogram", None)
        data = b"" if command == "stats" else out.read_bytes()
        outputs.append((data, report))
    assert outputs[0][1]["totals"]["removed"] > 0
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_strict_stops_at_the_first_bad_row_with_workers(two_sources, tmp_path, monkeypatch):
    from btrm.data import curate

    monkeypatch.setattr(curate, "CHUNK_ROWS", 2)
    a, _ = two_sources
    bad = write_jsonl(tmp_path / "bad.jsonl", [row("q", "a", "b"), row("q", "a", "c"), row("q", "", "x"),
                                               {"chosen": conv("q", "a")}])
    for n in (1, 2):
        with pytest.raises(ValueError, match=r"bad\.jsonl:3: field 'chosen': empty_response"):
            run_command("clean", [SourceConfig(path=str(a)), SourceConfig(path=str(bad))], tmp_path / "o.jsonl",
                        strict=True, num_proc=n)


@pytest.mark.slow
def test_filter_removes_flipped_labels(trained_checkpoint, tmp_path):
    """10% of labels flipped; the trained model separates the synthetic labels, so removing the pairs it contradicts
    by more than 1 raises the kept set's label agreement. Removals per source match the model's own rewards."""
    from btrm.inference.scorer import RewardModel
    from btrm.tiny import make_preference_rows

    rows = [{k: v for k, v in r.items() if k != "source"}  # count per file: a, b
            for r in make_preference_rows(300, seed=7)]  # not the training pairs (seed 0)
    flipped = set(range(0, len(rows), 10))
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flipped else r for i, r in enumerate(rows)]
    a = write_jsonl(tmp_path / "a.jsonl", rows[:150])
    b = write_jsonl(tmp_path / "b.jsonl", rows[150:])
    out = tmp_path / "kept.jsonl"
    assert btrm("filter", "--source", a, "--source", b, "--model", trained_checkpoint, "--max-disagreement", 1,
                "--num-proc", 2, "--output", out) == 0
    report = json.loads((tmp_path / "kept.report.json").read_text())
    kept = read_back(out)
    check_accounting(report, len(kept))

    rm = RewardModel.from_pretrained(trained_checkpoint)
    scores = rm.score_pairs([r["chosen"] for r in rows], [r["rejected"] for r in rows])
    contradicted = [s.chosen - s.rejected < -1 for s in scores]
    assert report["removed"] == {src: {"disagreement": sum(contradicted[lo:hi])}
                                 for src, lo, hi in (("a", 0, 150), ("b", 150, 300)) if sum(contradicted[lo:hi])}
    flipped_chosen = {json.dumps(rows[i]["chosen"]) for i in flipped}
    agreement_before = 1 - len(flipped) / len(rows)
    agreement_after = sum(json.dumps(p.chosen) not in flipped_chosen for p in kept) / len(kept)
    assert agreement_after > agreement_before + 0.03, (agreement_before, agreement_after)
    lines = [json.loads(x) for x in (tmp_path / "kept.scores.jsonl").read_text().splitlines()]
    assert [x["verdict"] == "disagreement" for x in lines] == contradicted  # every pair, in input order

    # --flag keeps everything and counts the same verdicts
    out = tmp_path / "flagged.parquet"
    assert btrm("filter", "--source", a, "--source", b, "--model", trained_checkpoint, "--max-disagreement", 1,
                "--flag", "--output", out) == 0
    flagged = json.loads((tmp_path / "flagged.report.json").read_text())
    assert flagged["totals"]["kept"] == len(rows) and flagged["flagged"] == report["removed"]


def test_seen_keys_matches_a_dict():
    """The numpy key set gives the same first-occurrence answers as a plain dict, across many run merges."""
    import numpy as np

    from btrm.data.curate import SeenKeys

    rng = np.random.default_rng(0)
    seen, first = SeenKeys(), {}
    for _ in range(60):
        keys = rng.integers(0, 500, size=int(rng.integers(1, 40))).astype(np.uint64)  # many repeats, in and across chunks
        src = rng.integers(0, 3, size=len(keys))
        expected = []
        for k, s in zip(keys.tolist(), src.tolist()):
            expected.append(first.get(k, -1))
            first.setdefault(k, s)
        assert seen.add(keys, src).tolist() == expected
    assert len(seen) == len(first) and len(seen.runs) < 10
