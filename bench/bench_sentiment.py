"""Escalation hit rate (issue 21): the offline default backend (`lexicon`) on the labelled set
tests/data/sentiment_eval.tsv, per language and per split, with plain VADER beside it.

A message escalates when the backend labels it negative. Per language and split: recall
(negatives escalated ÷ negatives, the Value column), false escalations (non-negatives
escalated ÷ non-negatives) and accuracy over the three labels. The `dev` split is the one the
lexicons and rules were tuned on; the `heldout*` splits were written apart and are only
reported. The misses of `heldout` to `heldout3` were studied and rules written for their
kinds of failure, and `heldout4` was read while the learned layer was built (no rule or
weight was written from it), so their figures flatter the analyser. The honest test is the
newest split, `heldout5`: written by someone who saw neither the rules, the corpus nor the
other splits, added after the learned table was frozen, and scored once. The learned layer's
own cross-validated figures on the training corpus (services/lexicons/corpus, written apart
from this file) are printed from the table's header. Targets for the offline default:
recall ≥ 0.90 and false escalations ≤ 0.05 in each language. The `llm` backend is not
measured here: the local fake model answers what it is scripted to, so its figures would say
nothing about a model's judgement (tests cover its batching, JSON and fallback); run
`flask chats sentiment-eval FILE --backend llm` against a real model.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from pathlib import Path

from bench.common import ROOT, result

NAME = "sentiment"
DESCRIPTION = "escalation recall and false escalations per language, offline analyser"

EVAL_FILE = ROOT / "tests" / "data" / "sentiment_eval.tsv"
# Filled by run() from the newest held-out split only (written after the rules it measures, and
# never tuned on): {"sentiment_recall_es_heldout4": 0.35, ...}.
FIGURES: dict[str, float] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sentiment")
    group.add_argument(
        "--sentiment-file",
        type=Path,
        help=f"labelled TSV (label, lang, split, text); default {EVAL_FILE.relative_to(ROOT)}",
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for row in reader if (row.get("text") or "").strip()]


_TABLE_FIGURE = re.compile(
    r"^#\s+(\w+): recall ([\d.]+) \((\d+) negatives\), false escalation ([\d.]+) \((\d+) others\)"
)


def _cross_validated() -> list[dict]:
    """The learned table's figures on its training corpus, out of fold, as training wrote them."""
    from services.lexicons import learned

    if not learned.TABLE_FILE.exists():
        return []
    out = []
    for line in learned.TABLE_FILE.read_text(encoding="utf-8").splitlines():
        match = _TABLE_FIGURE.match(line)
        if match:
            language, recall, negatives, false, others = match.groups()
            out.append(
                result(
                    f"{language} corpus, cross-validated",
                    float(recall),
                    "recall",
                    detail=(
                        f"false escalation {false}; {negatives} negatives and {others} others "
                        "of the training corpus, each scored by a model that did not learn "
                        "from it (5 folds), at the table's threshold"
                    ),
                    false_escalation=float(false),
                    n=int(negatives) + int(others),
                )
            )
    return out


def run(args: argparse.Namespace) -> list[dict]:
    from services.sentiment import evaluate

    FIGURES.clear()
    rows = _rows(getattr(args, "sentiment_file", None) or EVAL_FILE)
    splits = list(dict.fromkeys(row.get("split") or "all" for row in rows))
    newest_heldout = max((s for s in splits if s.startswith("heldout")), default=None)
    if len(splits) > 1:
        splits.append("all")
    out = []
    elapsed = {}
    for split in splits:
        chosen = [
            (row["label"].strip(), row["lang"].strip(), row["text"])
            for row in rows
            if split == "all" or (row.get("split") or "all") == split
        ]
        started = time.perf_counter()
        ours = evaluate(chosen, backend="lexicon")
        elapsed[split] = (time.perf_counter() - started, len(chosen))
        theirs = evaluate(chosen, backend="vader")
        for language, res in ours.items():
            out.append(
                result(
                    f"{language} {split}",
                    round(res.recall, 3),
                    "recall",
                    detail=(
                        f"false escalation {res.false_escalation:.2f}, accuracy "
                        f"{res.accuracy:.2f} (escalated {res.negatives_escalated}/"
                        f"{res.negatives} negatives, {res.others_escalated}/{res.others} "
                        f"others; VADER alone: recall {theirs[language].recall:.2f}, false "
                        f"escalation {theirs[language].false_escalation:.2f})"
                    ),
                    false_escalation=round(res.false_escalation, 3),
                    accuracy=round(res.accuracy, 3),
                    n=res.n,
                    vader_recall=round(theirs[language].recall, 3),
                    vader_false_escalation=round(theirs[language].false_escalation, 3),
                )
            )
            if split == newest_heldout:
                FIGURES[f"sentiment_recall_{language}_{split}"] = round(res.recall, 3)
                FIGURES[f"sentiment_false_escalation_{language}_{split}"] = round(
                    res.false_escalation, 3
                )
    out.extend(_cross_validated())
    seconds = sum(s for s, _ in elapsed.values() if s)
    messages = sum(n for _, n in elapsed.values())
    out.append(
        result(
            "offline analysis time",
            1000 * seconds / max(1, messages),
            "ms/message",
            detail=f"{messages} messages, language given (no detection)",
        )
    )
    return out
