"""Offline sentiment in VADER's manner for Spanish and Portuguese, and the customer-service
phrasing VADER lacks for English.

A message is split into words, emoji and punctuation; every word or phrase found in the
language's lexicon (es.tsv, pt.tsv, en.tsv here) gives a valence on VADER's -4..+4 scale,
which the rules then adjust as VADER does for English: a negator among the three words before
flips and damps it, an intensifier before (or "demais" after) raises it, a word in capitals
in a message that is not all capitals raises it, the clause after a contrast word ("pero",
"mas", "but") counts three times the clause before, and "!!" or "??" push the total further
in its direction. The sum is squashed to -1..1 like VADER's compound score.

The lexicons' single words take their valence from VADER's own lexicon (MIT licence) through
an English gloss, so `@angry` in es.tsv means "VADER's valence for angry"; phrases and slang
are rated by the team. The rules' word lists are this module's own.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

LEXICON_DIR = Path(__file__).parent
# VADER's normalisation constant: compound = s / sqrt(s^2 + ALPHA).
ALPHA = 15.0
NEGATION_FACTOR = -0.74
CAPS_BOOST = 0.733
EXCLAMATION_BOOST = 0.292
QUESTION_BOOST = 0.18
BOOSTER = 0.293
NEGATION_WINDOW = 3
# How far a "*" in a phrase reaches: one to this many words.
WILDCARD_WORDS = 3


@dataclass(frozen=True)
class LanguageRules:
    negators: frozenset[str]
    boosters: dict[str, float]  # before the word; a negative value damps
    post_boosters: dict[str, float]  # after the word ("facil demais")
    contrast: frozenset[str]  # the clause after one of these wins
    # A negator's reach ends at these ("no vino y perdi la manana": "perdi" is not negated).
    scope_breakers: frozenset[str] = frozenset()
    sibling: str | None = None  # a close language whose lexicon is tried for unknown words


def _boost(words: str, amount: float = BOOSTER) -> dict[str, float]:
    return dict.fromkeys(words.split(), amount)


RULES: dict[str, LanguageRules] = {
    "es": LanguageRules(
        negators=frozenset(
            "no nunca jamas ni tampoco sin ningun ninguna ninguno nada nadie".split()
        ),
        boosters={
            **_boost(
                "muy mucho mucha muchos muchas muchisimo muchisima demasiado demasiada tan tanto "
                "super re requete bastante realmente totalmente completamente absolutamente "
                "extremadamente increiblemente sumamente mega tremendamente verdaderamente "
                "especialmente siempre"
            ),
            **_boost("poco algo casi medio apenas ligeramente", -BOOSTER),
        },
        post_boosters=_boost("demasiado total"),
        contrast=frozenset({"pero"}),
        scope_breakers=frozenset({"y", "e", "pero", "que", "porque"}),
        sibling="pt",
    ),
    "pt": LanguageRules(
        negators=frozenset("nao nunca jamais nem sem nenhum nenhuma nada ninguem tampouco".split()),
        boosters={
            **_boost(
                "muito muita muitos muitas mto mt muitissimo demasiado tao tanto super mega bem "
                "bastante realmente totalmente completamente absolutamente extremamente "
                "incrivelmente sumamente verdadeiramente especialmente sempre"
            ),
            **_boost("pouco pouca meio quase levemente ligeiramente", -BOOSTER),
        },
        post_boosters=_boost("demais demasiado"),
        contrast=frozenset({"mas", "porem", "contudo", "entretanto", "todavia"}),
        scope_breakers=frozenset({"e", "mas", "que", "porque"}),
        sibling="es",
    ),
    # English words, negation and intensifiers are VADER's own; only phrases are added here.
    "en": LanguageRules(
        negators=frozenset(),
        boosters={},
        post_boosters={},
        contrast=frozenset({"but"}),
        scope_breakers=frozenset({"and", "but"}),
    ),
}

# Emoji and emoticons visitors use in support chats, rated by the team on VADER's scale.
EMOJI = {
    "😀": 2.0, "😃": 2.0, "😄": 2.0, "😁": 2.0, "😊": 2.0, "🙂": 1.2, "😍": 3.0, "🥰": 3.0,
    "😘": 2.0, "😉": 1.0, "🤗": 2.0, "😂": 1.0, "🤣": 1.0, "👍": 1.8, "👏": 2.0, "🙏": 1.5,
    "🎉": 2.5, "💯": 2.0, "✨": 1.0, "❤": 2.8, "💙": 2.5, "💚": 2.5, "💜": 2.5, "🧡": 2.5,
    "🥳": 2.5, "😎": 1.5, "✅": 1.0, "⭐": 1.5, "🌟": 1.5,
    "😡": -3.0, "😠": -2.8, "🤬": -3.5, "😤": -2.2, "😞": -2.0, "😔": -1.8, "😢": -2.0,
    "😭": -2.2, "😩": -2.2, "😫": -2.2, "😒": -1.8, "🙄": -1.8, "😑": -1.0, "😐": -0.5,
    "😕": -1.2, "🙁": -1.5, "☹": -1.8, "👎": -2.2, "💩": -2.5, "😖": -2.0, "😣": -1.8,
    "🤦": -1.8, "😱": -1.5, "💔": -2.2, "❌": -1.0,
    ":)": 1.8, ":-)": 1.8, ":D": 2.2, ";)": 1.2, ":(": -1.8, ":-(": -1.8, ":/": -1.0,
    ":-/": -1.0, ":'(": -2.0, ":p": 0.8, ":P": 0.8,
}  # fmt: skip

# Emoticons only stand alone: the ":/" of "https://" is not a frown.
_TOKEN = re.compile(
    r"(?<!\S)(?::'\(|[:;]-?[()/DPp])(?!\S)|[^\W_]+(?:['’][^\W_]+)*|[!?]+|[.,;:]+|\S",
    re.UNICODE,
)
_RUN = re.compile(r"(\w)\1{2,}")


def normalise(text: str) -> str:
    """Lower case without accents or apostrophes: how visitors type ("nao", "pesimo")."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).replace("'", "")


@dataclass
class Token:
    text: str
    norm: str
    kind: str  # word | punct | emoji
    clause: int = 0


def tokenise(text: str) -> list[Token]:
    tokens: list[Token] = []
    clause = 0
    for match in _TOKEN.finditer(text):
        raw = match.group()
        if raw in EMOJI or raw[0] in EMOJI:
            tokens.append(Token(raw, raw, "emoji", clause))
        elif raw[0].isalnum():
            tokens.append(Token(raw, normalise(raw.replace("’", "'")), "word", clause))
        elif raw[0] in "!?.,;:":
            tokens.append(Token(raw, raw, "punct", clause))
            clause += 1
        # anything else (symbols, variation selectors) carries no sentiment
    return tokens


@dataclass
class Phrase:
    words: tuple[str, ...]
    valence: float


@dataclass
class Lexicon:
    words: dict[str, float] = field(default_factory=dict)
    phrases: dict[str, list[Phrase]] = field(default_factory=dict)  # by first word
    # "=word": a new valence for one of VADER's own words where support chats use it
    # otherwise ("cancel" in "can I cancel an order?"); English only.
    vader_overrides: dict[str, float] = field(default_factory=dict)


def _expand(term: str) -> list[str]:
    """Expand endings: mal[o,a,os,as] -> malo, mala, malos, malas."""
    match = re.fullmatch(r"(.*)\[([^\]]*)\]", term)
    if not match:
        return [term]
    return [match.group(1) + ending for ending in match.group(2).split(",")]


@lru_cache(maxsize=1)
def vader_lexicon() -> dict[str, float]:
    """VADER's own word valences, read from the file the vaderSentiment package ships."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    valences: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            valences[parts[0]] = float(parts[1])
    return valences


class LexiconError(ValueError):
    pass


def parse_lexicon(lines: Iterable[str], source: str = "lexicon") -> Lexicon:
    lexicon = Lexicon()
    vader = vader_lexicon()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        term, _, value = line.rstrip("\n").partition("\t")
        value = value.strip()
        if value.startswith("@"):
            gloss = value[1:]
            if gloss not in vader:
                raise LexiconError(f"{source}:{number}: VADER has no entry {gloss!r}")
            valence = vader[gloss]
        else:
            try:
                valence = float(value)
            except ValueError:
                raise LexiconError(f"{source}:{number}: not a valence: {value!r}") from None
        term = term.strip()
        if term.startswith("="):
            lexicon.vader_overrides[term[1:]] = valence
            continue
        for form in _expand(normalise(term)):
            words = tuple(form.split())
            if len(words) == 1:
                lexicon.words[words[0]] = valence
            elif words:
                lexicon.phrases.setdefault(words[0], []).append(Phrase(words, valence))
    for candidates in lexicon.phrases.values():
        candidates.sort(key=lambda p: -len(p.words))
    return lexicon


@cache
def lexicon_for(language: str) -> Lexicon:
    path = LEXICON_DIR / f"{language}.tsv"
    if not path.exists():
        return Lexicon()
    return parse_lexicon(path.read_text(encoding="utf-8").splitlines(), path.name)


def _match_phrase(phrase: Phrase, tokens: list[Token], start: int) -> int:
    """How many tokens `phrase` covers from `start` (0: no match). Words only, one clause."""

    def match(p: int, t: int) -> int:
        if p == len(phrase.words):
            return t
        if phrase.words[p] == "*":
            for skip in range(1, WILDCARD_WORDS + 1):
                end = t + skip
                if end > len(tokens) or any(tok.kind != "word" for tok in tokens[t:end]):
                    break
                found = match(p + 1, end)
                if found:
                    return found
            return 0
        if t < len(tokens) and tokens[t].kind == "word" and tokens[t].norm == phrase.words[p]:
            return match(p + 1, t + 1)
        return 0

    end = match(0, start)
    return end - start if end else 0


def _word_valence(norm: str, lexicons: list[Lexicon]) -> float | None:
    forms = [norm]
    if _RUN.search(norm):  # "pessimooo", "muuuy"
        forms += [_RUN.sub(r"\1", norm), _RUN.sub(r"\1\1", norm)]
    for lexicon in lexicons:
        for form in forms:
            if form in lexicon.words:
                return lexicon.words[form]
    return None


@dataclass
class Scored:
    compound: float
    total: float
    hits: list[tuple[str, float]]  # (word or phrase, valence after the rules)


def score(text: str, language: str, *, beside_vader: bool = False) -> Scored:
    """VADER-style compound score of `text` with the lexicon of `language`.

    beside_vader: the score is added to VADER's (English), which reads emoji, punctuation and
    its own words itself; only this language's own entries count."""
    words = not beside_vader
    rules = RULES.get(language) or RULES["es"]
    lexicons = [lexicon_for(language)]
    if rules.sibling:
        lexicons.append(lexicon_for(rules.sibling))
    tokens = tokenise(text)
    letters = [ch for ch in text if ch.isalpha()]
    shouting = bool(letters) and all(ch.isupper() for ch in letters)
    consumed = [False] * len(tokens)
    valences: list[tuple[int, str, float]] = []  # (token index, what, valence)
    for index, token in enumerate(tokens):
        if consumed[index]:
            continue
        if token.kind == "emoji":
            if not words:
                continue  # VADER reads emoji itself
            valence = EMOJI.get(token.text) or EMOJI.get(token.text[0], 0.0)
            valences.append((index, token.text, valence))
            continue
        if token.kind != "word":
            continue
        phrase, span = None, 1
        for candidate in lexicons[0].phrases.get(token.norm, ()):
            span = _match_phrase(candidate, tokens, index)
            if span:
                phrase = candidate
                break
        if phrase is not None:
            valence, what = phrase.valence, " ".join(t.norm for t in tokens[index : index + span])
            for covered in range(index, index + span):
                consumed[covered] = True
            self_negated = any(w in rules.negators for w in phrase.words)
        else:
            span = 1
            found = _word_valence(token.norm, lexicons if words else lexicons[:1])
            if found is None or token.norm in rules.boosters:
                continue
            valence, what, self_negated = found, token.norm, False
        if valence == 0:
            continue
        direction = 1.0 if valence > 0 else -1.0
        if token.text.isupper() and len(token.text) > 1 and not shouting:
            valence += direction * CAPS_BOOST
        before: list[Token] = []
        for previous in reversed(tokens[max(0, index - NEGATION_WINDOW) : index]):
            if previous.clause != token.clause or previous.norm in rules.scope_breakers:
                break
            if previous.kind == "word":
                before.insert(0, previous)
        for distance, previous in enumerate(reversed(before)):
            boost = rules.boosters.get(previous.norm)
            if boost:
                valence += direction * boost * (1.0, 0.95, 0.9)[distance]
        after = index + span
        if after < len(tokens) and tokens[after].kind == "word":
            valence += direction * rules.post_boosters.get(tokens[after].norm, 0.0)
        if not self_negated and any(t.norm in rules.negators for t in before):
            valence *= NEGATION_FACTOR
        valences.append((index, what, valence))

    contrast_at = max(
        (i for i, t in enumerate(tokens) if t.kind == "word" and t.norm in rules.contrast),
        default=None,
    )
    hits: list[tuple[str, float]] = []
    for index, what, valence in valences:
        if contrast_at is not None:
            valence *= 0.5 if index < contrast_at else 1.5
        hits.append((what, round(valence, 3)))
    total = sum(v for _, v in hits)
    if words:
        total = emphasise(total, text)
    return Scored(squash(total), total, hits)


def emphasise(total: float, text: str) -> float:
    """Exclamation and repeated question marks push a score further its own way (as VADER)."""
    if total == 0:
        return 0.0
    extra = min(text.count("!"), 4) * EXCLAMATION_BOOST
    questions = text.count("?")
    if questions > 1:
        extra += min(questions * QUESTION_BOOST, 0.96)
    return total + extra if total > 0 else total - extra


def squash(total: float) -> float:
    compound = total / math.sqrt(total * total + ALPHA)
    return max(-1.0, min(1.0, compound))


def unsquash(compound: float) -> float:
    """The raw sum behind a VADER compound score (the inverse of squash)."""
    compound = max(-0.999, min(0.999, compound))
    return compound * math.sqrt(ALPHA / (1 - compound * compound))
