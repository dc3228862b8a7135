"""Which messages are complaints: a learned layer over the lexicons.

The lexicons and VADER's rules read feelings, but most support complaints state a fact that
no word of a lexicon rates ("the sofa arrived without its legs", "faz dois meses que tento
cancelar"). This layer weighs a message's features and says how likely it is a complaint:
its words (a negator's next words marked as negated, as VADER does), word pairs, word stems
(typos and verb endings), the words after a contrast ("but", "pero", "mas"), its shape
(!!!, ???, capitals, numbers, emoji, length) and the lexicon's own score.

The weights are a logistic regression trained on the team's labelled corpus
(services/lexicons/corpus/*.tsv, written for it, apart from the evaluation set) and kept as a
table in learned.tsv, read like a lexicon: a feature and its weight a line. `flask chats
sentiment-train` rebuilds the table, with cross-validated figures, in pure Python.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flask import current_app, has_app_context

from services import lexicons

log = logging.getLogger(__name__)

TABLE_FILE = Path(__file__).with_name("learned.tsv")
CORPUS_DIR = Path(__file__).with_name("corpus")

LABELS = ("negative", "neutral", "positive")
BIAS, THRESHOLD = "__bias__", "__threshold__"

# English negators after normalise (apostrophes gone: "don't" is "dont"); Spanish and
# Portuguese use their analyser's own.
EN_NEGATORS = frozenset(
    "not no never nothing nobody none nor neither cannot without nowhere dont didnt doesnt "
    "cant wont isnt wasnt arent werent havent hasnt hadnt couldnt wouldnt shouldnt aint".split()
)
NEGATION_WORDS = 3
STEM_LETTERS = 5


def _negators(language: str) -> frozenset[str]:
    rules = lexicons.RULES.get(language)
    own = rules.negators if rules and rules.negators else frozenset()
    return own | (EN_NEGATORS if language == "en" or not own else frozenset())


def _breakers(language: str) -> frozenset[str]:
    rules = lexicons.RULES.get(language)
    return (rules.scope_breakers | rules.contrast) if rules else frozenset()


def _contrast(language: str) -> frozenset[str]:
    rules = lexicons.RULES.get(language)
    return rules.contrast if rules else frozenset()


def features(text: str, language: str, lexicon_score: float) -> dict[str, float]:
    """The message's features and their values (1 for a present one)."""
    tokens = lexicons.tokenise(text or "", language)
    negators, breakers, contrast = _negators(language), _breakers(language), _contrast(language)
    found: dict[str, float] = {f"lang:{language}": 1.0}
    words: list[str] = []
    negated_left = 0
    after_contrast = False
    for token in tokens:
        if token.kind == "emoji":
            valence = lexicons.EMOJI.get(token.text) or lexicons.EMOJI.get(token.text[0], 0)
            found["emoji:" + ("-" if valence < 0 else "+" if valence > 0 else "0")] = 1.0
            continue
        if token.kind == "punct":
            negated_left = 0
            if "!" in token.text:
                found["shape:!" if len(token.text) == 1 else "shape:!!"] = 1.0
            if "?" in token.text:
                found["shape:?" if len(token.text) == 1 else "shape:??"] = 1.0
            words.append("|")  # no pair reaches over punctuation
            continue
        norm = lexicons._RUN_NORM.sub(r"\1\1", token.norm)  # "muuuy" and "muuy" alike
        raw = token.text
        if len(raw) >= 3 and raw.isalpha() and raw.isupper():
            found["shape:CAPS"] = 1.0
        if any(ch.isdigit() for ch in norm):
            found["shape:number"] = 1.0
            norm = "<n>"
        if norm in breakers:
            negated_left = 0
        word = norm
        if negated_left and norm not in negators:
            word = "~" + norm
            negated_left -= 1
        if norm in negators:
            negated_left = NEGATION_WORDS
        found["w:" + word] = 1.0
        if len(norm) > STEM_LETTERS + 1 and norm.isalpha():
            found["s:" + ("~" if word[0] == "~" else "") + norm[:STEM_LETTERS]] = 1.0
        if after_contrast:
            found[">" + word] = 1.0
        if norm in contrast:
            after_contrast = True
        words.append(word)
    for first, second in zip(words, words[1:], strict=False):
        if first != "|" and second != "|":
            found[f"b:{first}_{second}"] = 1.0
    count = sum(1 for w in words if w != "|")
    found["shape:" + ("short" if count <= 3 else "long" if count > 20 else "medium")] = 1.0
    found["lex"] = lexicon_score
    if lexicon_score <= -0.05:
        found["lex:negative"] = 1.0
    elif lexicon_score >= 0.05:
        found["lex:positive"] = 1.0
    return found


@dataclass(frozen=True)
class Table:
    weights: dict[str, float]
    bias: float
    threshold: float

    def probability(self, found: dict[str, float]) -> float:
        z = self.bias + sum(self.weights.get(name, 0.0) * value for name, value in found.items())
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class TableError(ValueError):
    pass


def parse_table(lines: Iterable[str], source: str = "learned.tsv") -> Table:
    weights: dict[str, float] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.rstrip("\n").rpartition("\t")
        try:
            weights[name] = float(value)
        except ValueError:
            raise TableError(f"{source}:{number}: not a feature and a weight: {line!r}") from None
    if BIAS not in weights or THRESHOLD not in weights:
        raise TableError(f"{source}: the {BIAS} and {THRESHOLD} lines are missing")
    bias, threshold = weights.pop(BIAS), weights.pop(THRESHOLD)
    return Table(weights, bias, threshold)


def table_path() -> Path:
    """SENTIMENT_TABLE when set (a table learned from this installation's own messages),
    else the table shipped with the code."""
    configured = current_app.config.get("SENTIMENT_TABLE") if has_app_context() else None
    return Path(configured) if configured else TABLE_FILE


def table() -> Table | None:
    """The table in use, or None when there is none (the lexicon alone then decides)."""
    return load_table(str(table_path()))


@cache
def load_table(path: str) -> Table | None:
    where = Path(path)
    if where == TABLE_FILE and not where.exists():
        return None
    try:
        return parse_table(where.read_text(encoding="utf-8").splitlines(), where.name)
    except (OSError, UnicodeDecodeError, TableError) as exc:
        # A bad configured table must not stop the analysis of visitor messages: it is
        # logged once per process and the shipped table answers.
        log.error("SENTIMENT_TABLE %s cannot be used (%s); using the shipped table", path, exc)
        return None if where == TABLE_FILE else load_table(str(TABLE_FILE))


# ------------------------------------------------------------------ training


@dataclass(frozen=True)
class Example:
    label: str
    language: str
    text: str


def read_corpus(paths: Sequence[Path]) -> list[Example]:
    """Labelled messages of TSV files whose header names label, lang and text."""
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    for path in paths:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for number, row in enumerate(reader, 2):
                label = (row.get("label") or "").strip().lower()
                language = (row.get("lang") or "").strip().lower()
                text = (row.get("text") or "").strip()
                if not text:
                    continue
                if label not in LABELS or not language:
                    raise TableError(f"{path}:{number}: needs a label and a lang: {row!r}")
                if (language, text) in seen:
                    continue
                seen.add((language, text))
                examples.append(Example(label, language, text))
    return examples


def _fit(
    rows: Sequence[tuple[dict[str, float], int]],
    l2: float,
    epochs: int = 15,
    seed: int = 7,
    rate: float = 0.3,
) -> tuple[dict[str, float], float]:
    """Logistic regression by Adagrad on the log loss with an L2 penalty (sparse updates)."""
    weights: dict[str, float] = {}
    squares: dict[str, float] = {}
    bias, bias_square = 0.0, 1e-8
    order = list(range(len(rows)))
    shuffle = random.Random(seed).shuffle
    for _ in range(epochs):
        shuffle(order)
        for index in order:
            found, target = rows[index]
            z = bias + sum(weights.get(name, 0.0) * value for name, value in found.items())
            error = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z)))) - target
            bias_square += error * error
            bias -= rate * error / math.sqrt(bias_square)
            for name, value in found.items():
                weight = weights.get(name, 0.0)
                gradient = error * value + l2 * weight
                square = squares.get(name, 1e-8) + gradient * gradient
                squares[name] = square
                weights[name] = weight - rate * gradient / math.sqrt(square)
    return weights, bias


def _rows(
    examples: Sequence[Example], score: Callable[[str, str], float], keep: set[str]
) -> list[tuple[dict[str, float], int]]:
    rows = []
    for example in examples:
        found = features(example.text, example.language, score(example.text, example.language))
        found = {name: value for name, value in found.items() if name in keep}
        rows.append((found, int(example.label == "negative")))
    return rows


def _common_features(examples: Sequence[Example], min_count: int) -> set[str]:
    counts: Counter[str] = Counter()
    for example in examples:
        counts.update(features(example.text, example.language, 0.0))
    kept = {name for name, count in counts.items() if count >= min_count}
    return kept | {"lex", "lex:negative", "lex:positive"}


def _folds(examples: Sequence[Example], k: int) -> list[int]:
    """A fold per example, stratified by language and label, the same every run."""
    fold = [0] * len(examples)
    groups: dict[tuple[str, str], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault((example.language, example.label), []).append(index)
    for members in groups.values():
        random.Random(11).shuffle(members)
        for position, index in enumerate(members):
            fold[index] = position % k
    return fold


@dataclass
class Figures:
    recall: float
    false_escalation: float
    negatives: int
    others: int


def rates(
    examples: Sequence[Example], probabilities: Sequence[float], threshold: float
) -> dict[str, Figures]:
    figures: dict[str, Figures] = {}
    counts: dict[str, list[int]] = {}
    for example, probability in zip(examples, probabilities, strict=True):
        tally = counts.setdefault(example.language, [0, 0, 0, 0])
        escalated = probability >= threshold
        if example.label == "negative":
            tally[0] += 1
            tally[1] += escalated
        else:
            tally[2] += 1
            tally[3] += escalated
    for language, (negatives, hit, others, false) in sorted(counts.items()):
        figures[language] = Figures(
            hit / negatives if negatives else 0.0,
            false / others if others else 0.0,
            negatives,
            others,
        )
    return figures


def choose_threshold(
    examples: Sequence[Example], probabilities: Sequence[float], max_false: float
) -> float:
    """The lowest threshold whose false escalations stay under `max_false` in every language
    (the lowest escalates the most complaints)."""
    candidates = sorted({round(p, 3) for p in probabilities} | {0.5})
    for threshold in candidates:
        if threshold < 0.2:
            continue
        if all(
            f.false_escalation <= max_false
            for f in rates(examples, probabilities, threshold).values()
        ):
            return threshold
    return max(candidates)


@dataclass
class Training:
    table: Table
    l2: float
    cross_validated: dict[str, Figures]
    examples: int
    features: int


def train(
    examples: Sequence[Example],
    score: Callable[[str, str], float],
    *,
    folds: int = 5,
    l2_choices: Sequence[float] = (1e-4, 1e-3),
    max_false: float = 0.05,
    min_count: int = 2,
    progress: Callable[[str], None] = lambda _: None,
) -> Training:
    """Cross-validate the penalty and the threshold, then fit on every example."""
    scores: dict[tuple[str, str], float] = {}

    def cached(text: str, language: str) -> float:
        key = (text, language)
        if key not in scores:
            scores[key] = score(text, language)
        return scores[key]

    fold_of = _folds(examples, folds)
    best: tuple[float, float, float, list[float]] | None = None
    for l2 in l2_choices:
        held_out = [0.0] * len(examples)
        for fold in range(folds):
            train_part = [e for e, f in zip(examples, fold_of, strict=True) if f != fold]
            weights, bias = _fit(
                _rows(train_part, cached, _common_features(train_part, min_count)), l2
            )
            model = Table(weights, bias, 0.5)
            for index, example in enumerate(examples):
                if fold_of[index] == fold:
                    found = features(
                        example.text, example.language, cached(example.text, example.language)
                    )
                    held_out[index] = model.probability(found)
        threshold = choose_threshold(examples, held_out, max_false)
        figures = rates(examples, held_out, threshold)
        worst_recall = min(f.recall for f in figures.values())
        progress(
            f"l2={l2:g}: threshold {threshold:.3f}, "
            + ", ".join(
                f"{lang} recall {f.recall:.2f} false {f.false_escalation:.2f}"
                for lang, f in figures.items()
            )
        )
        if best is None or worst_recall > best[0]:
            best = (worst_recall, l2, threshold, held_out)
    assert best is not None
    _, l2, threshold, held_out = best
    weights, bias = _fit(_rows(examples, cached, _common_features(examples, min_count)), l2)
    weights = {name: round(w, 4) for name, w in weights.items() if abs(w) >= 0.005}
    return Training(
        Table(weights, round(bias, 4), threshold),
        l2,
        rates(examples, held_out, threshold),
        len(examples),
        len(weights),
    )


def table_lines(training: Training, sources: Sequence[str]) -> list[str]:
    head = [
        "# Complaint weights learned by `flask chats sentiment-train`; do not edit by hand.",
        f"# From {training.examples} labelled messages of {', '.join(sources)} (the team's own).",
        f"# L2 penalty {training.l2:g}; {training.features} features. Cross-validated:",
        *(
            f"#   {lang}: recall {f.recall:.2f} ({f.negatives} negatives), "
            f"false escalation {f.false_escalation:.2f} ({f.others} others)"
            for lang, f in training.cross_validated.items()
        ),
        f"{BIAS}\t{training.table.bias}",
        f"{THRESHOLD}\t{training.table.threshold}",
    ]
    body = [
        f"{name}\t{weight}"
        for name, weight in sorted(
            training.table.weights.items(), key=lambda item: (-abs(item[1]), item[0])
        )
    ]
    return head + body
