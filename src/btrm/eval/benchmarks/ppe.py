"""PPE (lmarena-ai): human preference and verifiable correctness.

Preference (PPE-Human-Preference-V1, split `test`): `prompt, response_1, response_2, winner` with winner
"model_a" (response_1) / "model_b" (response_2) / "tie" / "tie (bothbad)". Accuracy against the human winner;
tie rows are kept as units with no completions (never scored) and counted, not judged. Multi-turn rows: the
dataset card's schema has `prompt`, `response_1`, `response_2` as plain strings (the turn count only in
`conv_metadata.turns`): earlier turns are not separate messages in the data, so a row is scored as one
[user prompt, assistant response] exchange holding whatever the prompt string holds; a prompt given as a message
list keeps all its turns (`core.chat`). Source of the rule: the PPE paper (lmarena/PPE's
code is not read here).

Correctness (PPE-{MMLU-Pro,MATH,GPQA,IFEval,MBPP-Plus}-Best-of-K, split `train`): `prompt, response_1..K,
scores` (1 = correct) and `sampled_conflict_pairs` (0-based index pairs, one correct and one incorrect). One unit
per conflict pair; accuracy pooled within each set, overall = mean over the sets. NOT confirmed against PPE's
official code.
"""

from __future__ import annotations

from btrm.eval.core import Benchmark, Scores, Unit, chat, mean, pct

WINNERS = {"model_a": ("response_1", "response_2"), "model_b": ("response_2", "response_1")}
CORRECTNESS_SETS = ("MMLU-Pro", "MATH", "GPQA", "IFEval", "MBPP-Plus")
CORRECTNESS_NOTE = "conflict-pair accuracy per set, mean over the sets: not confirmed against PPE's official code"


# ---------------------------------------------------------------------------------------------------------------
# Preference


def preference_units(records: list[dict]) -> list[Unit]:
    units = []
    for i, r in enumerate(records):
        rid = str(r.get("question_id", i))
        winner = r["winner"]
        if winner.startswith("tie"):
            units.append(Unit(id=rid, subset="all", completions={}, meta={"tie": True}))
            continue
        if winner not in WINNERS:
            raise ValueError(f"row {rid}: winner {winner!r}, expected model_a, model_b or tie*")
        better, worse = WINNERS[winner]
        completions = {"chosen": chat(r["prompt"], r[better]), "rejected": chat(r["prompt"], r[worse])}
        units.append(Unit(id=rid, subset="all", completions=completions, meta={"winner": winner}))
    return units


def preference_score(units: list[Unit]) -> tuple[list[float | None], Scores]:
    results = [None if u.meta.get("tie") else float(u.scores["chosen"] > u.scores["rejected"]) for u in units]
    judged = [r for r in results if r is not None]
    acc = pct(mean(judged))
    details = {"pairs": len(judged), "ties_skipped": len(results) - len(judged)}
    return results, Scores(acc, {"all": acc}, details)


# ---------------------------------------------------------------------------------------------------------------
# Correctness


def set_name(source: str) -> str:
    """File / folder / Hub name -> set name: 'PPE-MMLU-Pro-Best-of-K' -> 'MMLU-Pro', 'math/train-0' -> 'math'."""
    name = source.split("/")[0]
    return name.removeprefix("PPE-").removesuffix("-Best-of-K")


def correctness_units(records: list[dict]) -> list[Unit]:
    units = []
    for n, r in enumerate(records):
        subset = set_name(r["_source"])
        qid = r.get("question_id", n)
        for i, j in r["sampled_conflict_pairs"]:
            if r["scores"][i] == r["scores"][j]:
                raise ValueError(f"{subset} question {qid}: pair ({i}, {j}) is not one correct and one incorrect")
            good, bad = (i, j) if r["scores"][i] > r["scores"][j] else (j, i)
            completions = {
                "correct": chat(r["prompt"], r[f"response_{good + 1}"]),
                "incorrect": chat(r["prompt"], r[f"response_{bad + 1}"]),
            }
            units.append(Unit(id=f"{subset}:{qid}:{good}-{bad}", subset=subset, completions=completions))
    return units


def correctness_score(units: list[Unit]) -> tuple[list[float], Scores]:
    results = [1.0 if u.scores["correct"] > u.scores["incorrect"] else 0.0 for u in units]
    groups: dict[str, list[float]] = {}
    for u, r in zip(units, results):
        groups.setdefault(u.subset, []).append(r)
    subsets = {name: pct(mean(rs)) for name, rs in groups.items()}
    details = {"pooled": pct(mean(results)), "pairs": {name: len(rs) for name, rs in groups.items()}}
    notes = [CORRECTNESS_NOTE]
    if len(subsets) != len(CORRECTNESS_SETS):
        notes.append(f"overall over {len(subsets)} sets (the benchmark has {len(CORRECTNESS_SETS)})")
    return results, Scores(mean(list(subsets.values())), subsets, details, notes)


PREFERENCE = Benchmark(
    name="ppe-preference",
    column="PPE Preference",
    hub=(("lmarena-ai/PPE-Human-Preference-V1", "test"),),
    to_units=preference_units,
    score=preference_score,
)

CORRECTNESS = Benchmark(
    name="ppe-correctness",
    column="PPE Correctness",
    hub=tuple((f"lmarena-ai/PPE-{s}-Best-of-K", "train") for s in CORRECTNESS_SETS),
    to_units=correctness_units,
    score=correctness_score,
)
