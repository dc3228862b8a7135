"""Offline sentiment in VADER's manner for Spanish and Portuguese, and the customer-service
phrasing VADER lacks for English.

A message is split into words, emoji and punctuation; every word or phrase found in the
language's lexicon (es.tsv, pt.tsv, en.tsv here) gives a valence on VADER's -4..+4 scale,
which the rules then adjust as VADER does for English: a negator among the three words before
flips and damps it, an intensifier before (or "demais" after) raises it, a word in capitals
in a message that is not all capitals raises it, the clause after a contrast word ("pero",
"mas", "but") counts three times the clause before, and "!!" or "??" push the total further
in its direction. The sum is squashed to -1..1 like VADER's compound score.

Support chats need a few rules VADER lacks: chat shorthand ("q", "pq", "vc", "n") reads as
the word it stands for; a lexicon entry "stem~" covers every form of a verb ("estrope~":
estropeó, estropearon, estropeado); a clause that asks or requests ("¿cómo funciona...?",
"I'd like...") reports no feeling with its positive words, and a mild negative beside a
question is its subject ("comprei faz 3 dias, quando chega?"), as is any trouble short of an
outburst that a question for information names ("does the warranty cover water damage?",
"se eu errar a senha a conta bloqueia?"); "why ...??" is a complaint whatever it asks; an entry
"~ing" inside a phrase stands for any word with that ending ("you keep ~ing"), and "=some
words" is a phrase with no feeling ("=no need"); praise that opens or closes a complaint is
sarcasm (services.sentiment applies that one, for English too).

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

# Chat shorthand, read as the word it stands for, in the text and in the lexicon alike (after
# normalise: lower case, no accents, so "tô" is "to" and "ñ" is "n").
SLANG: dict[str, dict[str, str]] = {
    "es": {
        "q": "que", "k": "que", "xq": "porque", "pq": "porque", "porq": "porque",
        "tb": "tambien", "tmb": "tambien", "nd": "nada", "pa": "para", "toy": "estoy",
        "dnd": "donde", "xfa": "porfa", "nunk": "nunca",
    },
    "pt": {
        "q": "que", "pq": "porque", "vc": "voce", "vcs": "voces", "n": "nao", "naum": "nao",
        "nn": "nao", "tb": "tambem", "tbm": "tambem", "hj": "hoje", "nd": "nada",
        "mt": "muito", "mto": "muito", "msm": "mesmo", "ta": "esta", "to": "estou",
        "tava": "estava", "td": "tudo", "tds": "todos", "ngm": "ninguem", "pra": "para",
        "dps": "depois", "qdo": "quando", "qnd": "quando", "agr": "agora", "cmg": "comigo",
        "vdd": "verdade", "blz": "beleza",
    },
    "en": {
        "u": "you", "ur": "your", "pls": "please", "plz": "please", "thx": "thanks",
        "ty": "thanks", "rn": "now", "r": "are", "cuz": "because", "bc": "because",
    },
}  # fmt: skip

# A clause that asks or requests reports no feeling with its positive words ("¿cómo funciona
# la devolución?", "I'd like to upgrade"), and its mild negative ones ("quanto tempo demora?")
# are the subject asked about. Thanks stay thanks.
QUESTION_STARTERS: dict[str, frozenset[str]] = {
    "es": frozenset(
        "cual cuales cuando donde como cuanto cuanta cuantos cuantas quien quienes puedo "
        "pueden podrian podria podrias".split()
    ),
    "pt": frozenset(
        "qual quais quando onde como quanto quanta quantos quantas quem posso podem poderiam "
        "poderia".split()
    ),
    "en": frozenset(
        "what when where which who how can could do does did is are will would should may".split()
    ),
}
REQUEST_OPENERS: dict[str, tuple[tuple[str, ...], ...]] = {
    language: tuple(tuple(phrase.split()) for phrase in phrases)
    for language, phrases in {
        "es": (
            "quisiera",
            "me gustaria",
            "me encantaria saber",
            "queria saber",
            "quiero saber",
            "por favor",
            "porfa",
        ),
        "pt": (
            "gostaria",
            "adoraria saber",
            "queria saber",
            "quero saber",
            "por favor",
            "poderia",
        ),
        "en": (
            "id like",
            "i would like",
            "id love to know",
            "i would love to know",
            "please",
            "could you",
            "can you",
            "would you",
        ),
    }.items()
}
GRATITUDE = frozenset(
    "gracias grax agradezco agradecida agradecido obrigado obrigada obrigadao obg "
    "brigado brigada valeu agradeco thanks thank thankyou appreciate appreciated cheers".split()
)
MILD_NEGATIVE = -1.0
# In a clause that asks for information, a negative up to this strong is what it asks about
# ("is water damage covered?"); a stronger one is still a complaint ("how can you charge me
# twice?" has its own phrase, rated below it).
ASKED_ABOUT = -2.25
# Yes/no questions in Spanish and Portuguese have no opening word: these verbs and the
# conditional ("si/se/if ... ?") make them questions for information.
COVERAGE_VERBS: dict[str, frozenset[str]] = {
    "es": frozenset("cubre cubren incluye incluyen entra entran vale sirve".split()),
    "pt": frozenset("cobre cobrem inclui incluem vale serve".split()),
    "en": frozenset("cover covers covered include includes included".split()),
}
CONDITIONALS: dict[str, frozenset[str]] = {
    "es": frozenset({"si"}),
    "pt": frozenset({"se"}),
    "en": frozenset({"if"}),
}
ASKING_PAIRS: dict[str, frozenset[tuple[str, str]]] = {
    "es": frozenset({("que", "pasa"), ("que", "ocurre"), ("que", "hago")}),
    "pt": frozenset({("o", "que"), ("que", "acontece"), ("que", "faco")}),
    "en": frozenset({("what", "if"), ("what", "happens")}),
}
WHY_OPENERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "es": (("por", "que"), ("porque",)),
    "pt": (("por", "que"), ("porque",)),
    "en": (("why",),),
}
RHETORICAL_WHY = -1.2

# A short first clause of praise followed by a complaint is sarcasm ("genial, otra vez sin
# internet", "great, another update that breaks everything"): the praise counts against.
SARCASTIC_OPENERS: dict[str, frozenset[str]] = {
    "es": frozenset(
        "genial|que genial|perfecto|estupendo|maravilloso|que maravilla|fantastico|que bien|"
        "muy bien|excelente|bravo|enhorabuena|buenisimo|de lujo|fenomenal|que bonito|"
        "genial gracias|pues genial|vaya genial".split("|")
    ),
    "pt": frozenset(
        "otimo|que otimo|perfeito|maravilha|que maravilha|que beleza|beleza|show|que lindo|"
        "parabens|excelente|legal|que legal|muito bom|sensacional|top|nossa que otimo|"
        "que maravilha hein|otimo hein|show de bola".split("|")
    ),
    "en": frozenset(
        "great|oh great|just great|perfect|oh perfect|wonderful|oh wonderful|lovely|brilliant|"
        "fantastic|awesome|nice|amazing|excellent|well done|great job|cool|oh nice|wow great|"
        "just perfect|fantastic job|brilliant job|nice one|oh joy|yay".split("|")
    ),
}
SARCASM_PENALTY = 1.5
# After a praising opener, "again" alone is the complaint ("estupendo, otra vez igual").
REPETITION = frozenset(
    {"otra vez", "de nuevo", "de novo", "outra vez", "mais uma vez", "again", "once again"}
)
_OPENER = re.compile(r"\W*([^\W\d_][^,.;:!?…]*?)\s*[,.;:!…]+\s*(\S.*)", re.S)


# ... and thanks or congratulations that close a complaint ("the update wiped my settings,
# thanks for that"; "o app travou de novo, parabéns").
SARCASTIC_CLOSERS: dict[str, frozenset[str]] = {
    "es": frozenset(
        "gracias por eso|gracias eh|muchas gracias eh|enhorabuena|bravo|felicidades|"
        "gracias de verdad eh|muy bien hecho".split("|")
    ),
    "pt": frozenset(
        "obrigado por isso|obrigada por isso|valeu mesmo|obrigado viu|obrigada viu|valeu viu|"
        "parabens|parabens viu|parabens mesmo|muito bem".split("|")
    ),
    "en": frozenset(
        "thanks for that|thanks a lot|thanks a bunch|cheers for that|well done|congrats|"
        "bravo|great job|nice job|good job|thanks so much for that".split("|")
    ),
}
_CLOSER = re.compile(r"(.*\S)\s*[,.;:!…-]+\s*([^\W\d_][^,.;:!?…]*?)[\s.!…]*", re.S)


def before_sarcastic_closer(text: str, language: str) -> str | None:
    """The start of `text` when a clause of thanks or congratulations closes it."""
    match = _CLOSER.fullmatch(text or "")
    if not match:
        return None
    closer = " ".join(normalise(match.group(2)).split())
    if closer in SARCASTIC_CLOSERS.get(language, ()):
        return match.group(1)
    return None


def after_sarcastic_opener(text: str, language: str) -> str | None:
    """The rest of `text` when it opens with a short clause of praise (a sarcasm candidate)."""
    match = _OPENER.match(text or "")
    if not match:
        return None
    opener = " ".join(_RUN_NORM.sub(r"\1", normalise(match.group(1))).split())
    if opener in SARCASTIC_OPENERS.get(language, ()):
        return match.group(2)
    return None


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
_RUN_NORM = re.compile(r"([^\W\d])\1{2,}")


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
    start: int = 0  # where it stands in the text
    end: int = 0


def tokenise(text: str, language: str | None = None) -> list[Token]:
    slang = SLANG.get(language or "", {})
    tokens: list[Token] = []
    clause = 0
    for match in _TOKEN.finditer(text):
        raw = match.group()
        where = match.start(), match.end()
        if raw in EMOJI or raw[0] in EMOJI:
            tokens.append(Token(raw, raw, "emoji", clause, *where))
        elif raw[0].isalnum():
            norm = normalise(raw.replace("’", "'"))
            tokens.append(Token(raw, slang.get(norm, norm), "word", clause, *where))
        elif raw[0] in "!?.,;:":
            tokens.append(Token(raw, raw, "punct", clause, *where))
            clause += 1
        # anything else (symbols, variation selectors) carries no sentiment
    return tokens


@dataclass
class Phrase:
    words: tuple[str, ...]
    valence: float
    # "=several words": no feeling at all here, whatever the words say alone ("no need");
    # beside VADER, its words are hidden from VADER too.
    neutral: bool = False


@dataclass
class Lexicon:
    words: dict[str, float] = field(default_factory=dict)
    phrases: dict[str, list[Phrase]] = field(default_factory=dict)  # by first word
    # "=word": a new valence for one of VADER's own words where support chats use it
    # otherwise ("cancel" in "can I cancel an order?"); English only. "=some words" is a
    # phrase with no feeling (Phrase.neutral), in any language.
    vader_overrides: dict[str, float] = field(default_factory=dict)
    # "stem~": every word that starts with the stem (a verb's forms: "estrope~" reads
    # estropeó, estropearon, estropeado); longest stems first.
    stems: list[tuple[str, float]] = field(default_factory=list)
    stem_phrases: list[Phrase] = field(default_factory=list)  # phrases opening with a stem


def _expand(term: str) -> list[str]:
    """Expand alternatives in brackets, anywhere and as often as written:
    mal[o,a,os,as] -> malo, mala, malos, malas; "faz * dia[,s] que" -> "faz * dia que", ..."""
    match = re.search(r"\[([^\]]*)\]", term)
    if not match:
        return [term]
    head, tail = term[: match.start()], term[match.end() :]
    return [form for ending in match.group(1).split(",") for form in _expand(head + ending + tail)]


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


def _word_matches(pattern: str, norm: str) -> bool:
    if pattern.endswith("~"):
        return len(norm) >= len(pattern) and norm.startswith(pattern[:-1])
    if pattern.startswith("~"):  # an ending: "~ing" reads "promising", "breaking"
        return len(norm) > len(pattern) and norm.endswith(pattern[1:])
    return norm == pattern


def parse_lexicon(
    lines: Iterable[str], source: str = "lexicon", language: str | None = None
) -> Lexicon:
    lexicon = Lexicon()
    slang = SLANG.get(language or "", {})
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
        neutral = term.startswith("=") and " " in term.strip("= ")
        if term.startswith("=") and not neutral:
            lexicon.vader_overrides[term[1:]] = valence
            continue
        if neutral:
            term, valence = term[1:], 0.0
        for form in _expand(normalise(term)):
            words = tuple(slang.get(word, word) for word in form.split())
            if words and words[0].startswith("~"):
                raise LexiconError(f"{source}:{number}: a term cannot open with an ending")
            if len(words) == 1 and words[0].endswith("~"):
                lexicon.stems.append((words[0][:-1], valence))
            elif len(words) == 1:
                lexicon.words[words[0]] = valence
            elif words and words[0].endswith("~"):
                lexicon.stem_phrases.append(Phrase(words, valence, neutral))
            elif words:
                lexicon.phrases.setdefault(words[0], []).append(Phrase(words, valence, neutral))
    for candidates in lexicon.phrases.values():
        candidates.sort(key=lambda p: -len(p.words))
    lexicon.stems.sort(key=lambda item: -len(item[0]))
    return lexicon


@cache
def lexicon_for(language: str) -> Lexicon:
    path = LEXICON_DIR / f"{language}.tsv"
    if not path.exists():
        return Lexicon()
    return parse_lexicon(path.read_text(encoding="utf-8").splitlines(), path.name, language)


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
        if (
            t < len(tokens)
            and tokens[t].kind == "word"
            and _word_matches(phrase.words[p], tokens[t].norm)
        ):
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
        for stem, valence in lexicon.stems:
            if any(len(form) > len(stem) and form.startswith(stem) for form in forms):
                return valence
    return None


@dataclass
class Scored:
    compound: float
    total: float
    hits: list[tuple[str, float]]  # (word or phrase, valence after the rules)
    # Where each hit and each neutral phrase stands in the text: (start, end, valence).
    spans: list[tuple[int, int, float]] = field(default_factory=list)
    # Where the clauses that ask about something stand (see asked_about_clauses).
    asked: list[tuple[int, int]] = field(default_factory=list)


def score(text: str, language: str, *, beside_vader: bool = False) -> Scored:
    """VADER-style compound score of `text` with the lexicon of `language`.

    beside_vader: the score is added to VADER's (English), which reads emoji, punctuation and
    its own words itself; only this language's own entries count."""
    words = not beside_vader
    rules = RULES.get(language) or RULES["es"]
    lexicons = [lexicon_for(language)]
    if rules.sibling:
        lexicons.append(lexicon_for(rules.sibling))
    tokens = tokenise(text, language)
    asking = question_clauses(tokens, language)
    asked = asked_about_clauses(tokens, language, text)
    letters = [ch for ch in text if ch.isalpha()]
    shouting = bool(letters) and all(ch.isupper() for ch in letters)
    consumed = [False] * len(tokens)
    valences: list[tuple[int, str, float]] = []  # (token index, what, valence)
    ends: dict[int, int] = {}  # token index -> end of its hit in the text
    spans: list[tuple[int, int, float]] = []
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
        candidates = [
            *lexicons[0].phrases.get(token.norm, ()),
            *(p for p in lexicons[0].stem_phrases if _word_matches(p.words[0], token.norm)),
        ]
        candidates.sort(key=lambda p: -len(p.words))
        for candidate in candidates:
            span = _match_phrase(candidate, tokens, index)
            if span:
                phrase = candidate
                break
        if phrase is not None:
            valence, what = phrase.valence, " ".join(t.norm for t in tokens[index : index + span])
            for covered in range(index, index + span):
                consumed[covered] = True
            if phrase.neutral:
                spans.append((token.start, tokens[index + span - 1].end, 0.0))
                continue
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
        if (
            token.clause in asking
            and (MILD_NEGATIVE < valence or (token.clause in asked and ASKED_ABOUT < valence))
            and GRATITUDE.isdisjoint(what.split())
        ):
            continue
        valences.append((index, what, valence))
        ends[index] = tokens[index + span - 1].end
    valences += _rhetorical_why(tokens, language)

    if asking and all(valence > MILD_NEGATIVE for _, _, valence in valences):
        # "comprei faz 3 dias, quando chega?": a mild complaint beside a question is the
        # question's subject; a strong one ("¿por qué me cobraron dos veces??") stays.
        valences = [item for item in valences if item[2] >= 0]
    contrast_at = max(
        (i for i, t in enumerate(tokens) if t.kind == "word" and t.norm in rules.contrast),
        default=None,
    )
    hits: list[tuple[str, float]] = []
    for index, what, valence in valences:
        if contrast_at is not None:
            valence *= 0.5 if index < contrast_at else 1.5
        hits.append((what, round(valence, 3)))
        if index in ends:
            spans.append((tokens[index].start, ends[index], round(valence, 3)))
    total = sum(v for _, v in hits)
    if words:
        total = emphasise(total, text)
    clauses = {}
    for token in tokens:
        if token.clause in asked:
            start, _ = clauses.get(token.clause, (token.start, 0))
            clauses[token.clause] = (start, token.end)
    return Scored(squash(total), total, hits, sorted(spans), list(clauses.values()))


def _rhetorical_why(tokens: list[Token], language: str) -> list[tuple[int, str, float]]:
    """A "why ...??" clause is a complaint ("why is my account locked??"), whatever it asks."""
    found = []
    openers = WHY_OPENERS.get(language, ())
    for index, token in enumerate(tokens):
        if token.kind != "punct" or token.text.count("?") < 2:
            continue
        words = [t.norm for t in tokens[:index] if t.clause == token.clause and t.kind == "word"]
        if any(tuple(words[: len(opener)]) == opener for opener in openers):
            found.append((index, "why ??", RHETORICAL_WHY))
    return found


def asked_about_clauses(tokens: list[Token], language: str, text: str) -> set[int]:
    """The clauses that ask for information ("does the warranty cover water damage?", "how do
    I report a damaged item?", "se eu errar a senha a conta bloqueia?"): the trouble they name
    is what they ask about, no complaint. A clause opening with "why", and any message with
    "??" or "!", asks in anger or not at all."""
    if "??" in text or "!" in text or "¿¿" in text:
        return set()
    starters = QUESTION_STARTERS.get(language, frozenset()) | CONDITIONALS.get(language, set())
    covers = COVERAGE_VERBS.get(language, frozenset())
    words_of: dict[int, list[str]] = {}
    marked: set[int] = set()
    for token in tokens:
        if token.kind == "word":
            words_of.setdefault(token.clause, []).append(token.norm)
        elif token.kind == "punct" and "?" in token.text:
            marked.add(token.clause)
    asked = set()
    for clause, words in words_of.items():
        opens = words[0] in starters or tuple(words[:2]) in ASKING_PAIRS.get(language, ())
        if clause in marked and (opens or covers.intersection(words)):
            asked.add(clause)
        elif opens and clause == 0 and words[0] in QUESTION_STARTERS.get(language, ()):
            asked.add(clause)
    return asked


def question_clauses(tokens: list[Token], language: str) -> set[int]:
    """The clauses that ask ("...?", or a message opening with "cuándo", "how") or request
    ("quisiera", "I'd like"). A clause ending in "!" exclaims ("how nice!", "como sempre!")."""
    asking: set[int] = set()
    exclaiming: set[int] = set()
    starters = QUESTION_STARTERS.get(language, frozenset())
    openers = REQUEST_OPENERS.get(language, ())
    first_word: dict[int, int] = {}
    for index, token in enumerate(tokens):
        if token.kind == "punct" and "?" in token.text:
            asking.add(token.clause)
        elif token.kind == "punct" and "!" in token.text:
            exclaiming.add(token.clause)
        elif token.kind == "word":
            first_word.setdefault(token.clause, index)
    for clause, index in first_word.items():
        if clause in exclaiming:
            continue
        words = tuple(t.norm for t in tokens[index : index + 4] if t.clause == clause)
        asks = index == 0 and words[0] in starters and words[1:2] != ("siempre",)
        asks = asks and words[1:2] != ("sempre",)
        if asks or any(words[: len(opener)] == opener for opener in openers):
            asking.add(clause)
    return asking


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
