"""Language and sentiment of visitor messages.

Backends (SENTIMENT_BACKEND):
- `lexicon` (default, offline): English is VADER plus the customer-service phrases VADER
  lacks (where a phrase and VADER disagree about a word, as "helps" in "nobody helps", the
  phrase decides); Spanish and Portuguese use our own lexicons and VADER's rules
  (services/lexicons).
- `vader`: VADER alone, whatever the language (the old default, kept for comparison).
- `llm`: the configured OpenAI-compatible model, a burst of messages in one request with a
  JSON answer and a short timeout; the offline lexicon answers whenever the model does not.

The language comes from py3langid, whose model ships inside the package (nothing is
downloaded), restricted to SENTIMENT_LANGUAGES: on short chat messages a three-way choice is
far more reliable than a choice among 97 languages.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import openai
from flask import current_app, has_app_context

from services import lexicons
from services.lexicons import learned

log = logging.getLogger(__name__)

POSITIVE, NEUTRAL, NEGATIVE = "positive", "neutral", "negative"
LABELS = (NEGATIVE, NEUTRAL, POSITIVE)
BACKENDS = ("lexicon", "vader", "llm")
DEFAULT_LANGUAGES = ("en", "es", "pt")
# Fewer letters than this ("ok", "??", "👍") say nothing about the language.
MIN_LETTERS_FOR_LANGUAGE = 2
LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "pt": "Portuguese"}


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float  # -1 (very negative) .. 1 (very positive)
    backend: str
    language: str | None = None


def _config(name: str, default):
    return current_app.config.get(name, default) if has_app_context() else default


def label_for(score: float, threshold: float) -> str:
    if score <= -threshold:
        return NEGATIVE
    if score >= threshold:
        return POSITIVE
    return NEUTRAL


# ------------------------------------------------------------------ language


def configured_languages() -> tuple[str, ...]:
    raw = _config("SENTIMENT_LANGUAGES", ",".join(DEFAULT_LANGUAGES))
    languages = tuple(dict.fromkeys(code.strip().lower() for code in raw.split(",") if code))
    return languages or DEFAULT_LANGUAGES


# Greetings and courtesies that open most chats, and that a character-based model, with so
# few letters to go on, often takes for a neighbouring language ("hola" for English).
SHORT_MESSAGE_MARKERS = {
    "en": frozenset("hi hello hey thanks thank thx please bye cheers".split()),
    "es": frozenset("hola gracias buenas buenos tal vale adios porfa saludos".split()),
    "pt": frozenset("oi ola obrigado obrigada valeu vlw tudo bom boa tchau beleza blz".split()),
}
SHORT_MESSAGE_LETTERS = 20

_identifier_lock = threading.Lock()


@lru_cache(maxsize=4)
def _identifier(languages: tuple[str, ...]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)
    if len(languages) > 1:
        identifier.set_languages(list(languages))
    return identifier


def warm_up() -> None:
    """Load the language model (one to two seconds) and the complaint weights in the
    background, so that the first reply to a visitor does not wait for them."""

    table = str(learned.table_path())  # (read here: the thread has no app context)

    def load() -> None:
        with _identifier_lock:
            _identifier(DEFAULT_LANGUAGES)
        learned.load_table(table)

    threading.Thread(target=load, name="langid-warm-up", daemon=True).start()


# Markup and links in a message are no words of its language: a pasted tracking URL, or
# tags a hostile visitor types, made the detector guess Portuguese for "no funciona nada" and
# the analyser read it as praise. Both read the message without them.
_MARKUP = re.compile(r"<[^<>]{1,500}>")
_LINK = re.compile(r"(?:\bhttps?://|\bwww\.)\S+", re.IGNORECASE)


def readable(text: str) -> str:
    """The message as a person reads it: without tags and links."""
    if "<" not in text and "http" not in text.lower() and "www." not in text.lower():
        return text
    return _LINK.sub(" ", _MARKUP.sub(" ", text))


def detect_language(text: str, languages: Sequence[str] | None = None) -> str | None:
    """ISO 639-1 code of the message's language among `languages`, or None for a message
    with (almost) no letters."""
    text = readable(text or "")
    if sum(ch.isalpha() for ch in text or "") < MIN_LETTERS_FOR_LANGUAGE:
        return None
    choices = tuple(languages or configured_languages())
    if len(choices) == 1:
        return choices[0]
    if sum(ch.isalpha() for ch in text) < SHORT_MESSAGE_LETTERS:
        words = set(re.findall(r"\w+", lexicons.normalise(text)))
        marked = [code for code in choices if words & SHORT_MESSAGE_MARKERS.get(code, set())]
        if len(marked) == 1:
            return marked[0]
    with _identifier_lock:  # built once per process (one to two seconds); classify is cheap
        try:
            identifier = _identifier(choices)
        except ValueError as exc:  # a code py3langid does not know, in SENTIMENT_LANGUAGES
            log.error("SENTIMENT_LANGUAGES %s: %s; using %s", choices, exc, DEFAULT_LANGUAGES)
            identifier = _identifier(DEFAULT_LANGUAGES)
    return identifier.classify(text)[0]


# ------------------------------------------------------------------ offline backends


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _vader_for_support():
    """VADER with the few words support chats use otherwise re-rated (en.tsv's "=word")."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyser = SentimentIntensityAnalyzer()
    analyser.lexicon = {**analyser.lexicon, **lexicons.lexicon_for("en").vader_overrides}
    return analyser


def vader(text: str, threshold: float = 0.05, language: str | None = None) -> Sentiment:
    score = float(_vader().polarity_scores(text or "")["compound"])
    return Sentiment(label_for(score, threshold), round(score, 4), "vader", language)


def lexicon_score(text: str, language: str) -> float:
    """The offline compound score: our lexicons for Spanish and Portuguese; for English (and
    languages without a lexicon) VADER, plus the English customer-service phrases. Praise
    that opens or closes a complaint ("genial, otra vez sin internet") is read as sarcasm."""
    for rest in (
        lexicons.after_sarcastic_opener(text or "", language),
        lexicons.before_sarcastic_closer(text or "", language),
    ):
        if rest is None or not _complains(rest, language):
            continue
        # Once the praise is sarcastic, so are any thanks beside it ("great, another update
        # that breaks everything. thanks a lot"): the complaint's own words decide.
        rest_score = min(_plain_score(rest, language), _plain_score(_thankless(rest), language))
        if rest_score < 0:
            return lexicons.squash(lexicons.unsquash(rest_score) - lexicons.SARCASM_PENALTY)
    return _plain_score(text or "", language)


def _complains(text: str, language: str) -> bool:
    """`text` has a complaint of the support lexicon: for English any of its phrase layer
    (VADER's "worried" after "nice," is no sarcasm, "broken again" is); otherwise more than
    a mild one once the contrast is weighed ("genial, estaba preocupado pero ya está")."""
    if language == "en":
        return any(valence < 0 for _, valence in lexicons.score(text, "en", beside_vader=True).hits)
    hits = lexicons.score(text, language).hits
    if any(what in lexicons.REPETITION for what, valence in hits if valence < 0):
        return True
    return sum(valence for _, valence in hits if valence < 0) <= lexicons.MILD_NEGATIVE


def _thankless(text: str) -> str:
    return re.sub(
        r"[^\W\d_]+",
        lambda m: "" if lexicons.normalise(m.group()) in lexicons.GRATITUDE else m.group(),
        text,
    )


def _plain_score(text: str, language: str) -> float:
    if language in ("es", "pt"):
        return lexicons.score(text, language).compound
    if language != "en":
        return float(_vader().polarity_scores(text)["compound"])
    phrases = lexicons.score(text, "en", beside_vader=True)
    compound = float(_vader_for_support().polarity_scores(_for_vader(text, phrases))["compound"])
    if compound > 0 and _only_asks(text):
        # VADER has no notion of a question: "how do I get a better plan?" is no praise.
        compound = 0.0
    if not phrases.hits:
        return compound
    return lexicons.squash(lexicons.unsquash(compound) + phrases.total)


# Idioms VADER reads word by word, rewritten into words it reads right: its "nothing" negates
# what follows, but "nothing but problems" is only problems.
VADER_IDIOMS = ((re.compile(r"\bnothing but\b", re.I), "only"),)


def _for_vader(text: str, phrases: lexicons.Scored) -> str:
    """`text` as VADER should read it beside the support phrases: a phrase's words that VADER
    rates the other way are hidden ("nobody helps", "you keep promising"), as are all the
    words of a neutral phrase ("no need") and the trouble a question asks about ("does the
    warranty cover water damage?")."""
    valences = _vader_for_support().lexicon
    hidden: list[tuple[int, int]] = []
    for start, end, valence in phrases.spans:
        for word in re.finditer(r"[^\W_]+(?:'[^\W_]+)*", text[start:end]):
            rated = valences.get(word.group().lower(), 0.0)
            if valence == 0 or rated * valence < 0:
                hidden.append((start + word.start(), start + word.end()))
    for start, end in phrases.asked:
        for word in re.finditer(r"[^\W_]+(?:'[^\W_]+)*", text[start:end]):
            if lexicons.ASKED_ABOUT < valences.get(word.group().lower(), 0.0) < 0:
                hidden.append((start + word.start(), start + word.end()))
    for start, end in sorted(set(hidden), reverse=True):
        text = text[:start] + "x" + text[end:]
    for idiom, plain in VADER_IDIOMS:
        text = idiom.sub(plain, text)
    return text


def _only_asks(text: str) -> bool:
    """Every clause of an English message asks or requests, and it thanks nobody."""
    tokens = lexicons.tokenise(text, "en")
    clauses = {token.clause for token in tokens if token.kind == "word"}
    if not clauses or any(t.norm in lexicons.GRATITUDE for t in tokens):
        return False
    return clauses <= lexicons.question_clauses(tokens, "en")


def offline(text: str, language: str | None = None, threshold: float | None = None) -> Sentiment:
    """The lexicon's reading of the feeling, and the learned layer's of whether it is a
    complaint (services/lexicons/learned.py): a complaint is negative whatever its words
    say ("great product if you like waiting 3 weeks"), and a message the layer clears is at
    worst neutral ("do refunds go back to the card?"). Its score is then the lexicon's where
    that agrees, else the layer's confidence on the same scale."""
    threshold = _config("SENTIMENT_THRESHOLD", 0.05) if threshold is None else threshold
    text = readable(text or "")
    language = language or detect_language(text)
    score = lexicon_score(text, language or "en")
    label = label_for(score, threshold)
    table = learned.table()
    if table is not None:
        found = learned.features(text, language or "en", score)
        probability = table.probability(found)
        if probability >= table.threshold:
            # The lexicon's own strength where it read a complaint too ("negative −0.62");
            # else the layer's confidence, which for a clear case is close to −1.
            label, score = NEGATIVE, (score if label == NEGATIVE else -probability)
        elif label == NEGATIVE:
            label, score = NEUTRAL, 0.0
    return Sentiment(label, round(score, 4), "lexicon", language)


# ------------------------------------------------------------------ the LLM backend

LLM_SYSTEM_PROMPT = (
    "You rate the sentiment of messages that customers wrote to a support chat, in any "
    "language (often Spanish or Portuguese, with typos and without accents). Judge what the "
    "customer feels about the service: complaints, threats to cancel, sarcasm and repeated "
    "waiting are negative; plain questions are neutral; thanks and praise are positive. "
    'Answer with JSON only, in this shape: {"results": [{"id": <the message id>, '
    '"score": <number from -1 (very negative) to 1 (very positive)>}]}, one result per message.'
)


class LLMSentimentError(RuntimeError):
    pass


def _llm_scores(texts: Sequence[str]) -> list[float | None]:
    """One request for all `texts`; a score per text, None where the answer lacks it."""
    from services.assistant import client_or_none

    client = client_or_none(timeout=_config("SENTIMENT_LLM_TIMEOUT", 5.0))
    if client is None:
        raise LLMSentimentError("no model configured")
    payload = [{"id": index, "text": text[:2000]} for index, text in enumerate(texts)]
    request = {
        "model": _config("SENTIMENT_LLM_MODEL", "") or _config("OPENAI_MODEL", "gpt-4o-mini"),
        "temperature": 0,
        "max_tokens": 40 + 20 * len(texts),
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": LLM_SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps({"messages": payload}, ensure_ascii=False)},
        ],
    }
    try:
        response = client.chat.completions.create(**request)
    except openai.BadRequestError:
        # Some OpenAI-compatible servers have no JSON mode: the prompt asks for JSON anyway.
        del request["response_format"]
        response = client.chat.completions.create(**request)
    raw = (response.choices[0].message.content or "").strip()
    try:
        results = json.loads(raw)["results"]
        scores: list[float | None] = [None] * len(texts)
        for item in results:
            index = item["id"]
            if isinstance(index, int) and 0 <= index < len(texts):
                scores[index] = max(-1.0, min(1.0, float(item["score"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise LLMSentimentError(f"answer was not the JSON asked for: {raw[:80]!r}") from exc
    return scores


def _llm_many(texts: Sequence[str], languages: Sequence[str | None], threshold: float):
    batch = max(1, int(_config("SENTIMENT_LLM_BATCH", 20)))
    results: list[Sentiment] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        chunk_languages = languages[start : start + batch]
        try:
            scores = _llm_scores(chunk)
        except Exception as exc:  # noqa: BLE001 - a provider error must not lose the analysis
            log.warning("LLM sentiment failed (%s); using the offline lexicon", exc)
            scores = [None] * len(chunk)
        for text, language, score in zip(chunk, chunk_languages, scores, strict=True):
            if score is None:
                results.append(offline(text, language, threshold))
            else:
                label = label_for(score, threshold)
                results.append(Sentiment(label, round(score, 4), "llm", language))
    return results


# ------------------------------------------------------------------ entry points


def backend_name(backend: str | None = None) -> str:
    name = (backend or _config("SENTIMENT_BACKEND", "lexicon")).strip().lower()
    return name if name in BACKENDS else "lexicon"


def analyse_many(
    texts: Sequence[str],
    languages: Sequence[str | None] | None = None,
    *,
    backend: str | None = None,
) -> list[Sentiment]:
    """Sentiment of each text, in order; `languages` (detected when None) are kept on them."""
    texts = [text or "" for text in texts]
    if languages is None:
        languages = [detect_language(text) for text in texts]
    threshold = _config("SENTIMENT_THRESHOLD", 0.05)
    name = backend_name(backend)
    if name == "llm":
        return _llm_many(texts, list(languages), threshold)
    if name == "vader":
        return [vader(t, threshold, lang) for t, lang in zip(texts, languages, strict=True)]
    return [offline(t, lang, threshold) for t, lang in zip(texts, languages, strict=True)]


def analyse(text: str, language: str | None = None, *, backend: str | None = None) -> Sentiment:
    return analyse_many([text], [language or detect_language(text)], backend=backend)[0]


# ------------------------------------------------------------------ evaluation


@dataclass
class EvalResult:
    language: str
    n: int = 0
    correct: int = 0
    negatives: int = 0
    negatives_escalated: int = 0
    others: int = 0
    others_escalated: int = 0
    fallbacks: int = 0  # answered by the offline lexicon instead of the backend asked for
    confusions: list[tuple[str, str, float, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def recall(self) -> float:
        return self.negatives_escalated / self.negatives if self.negatives else 0.0

    @property
    def false_escalation(self) -> float:
        return self.others_escalated / self.others if self.others else 0.0

    def line(self) -> str:
        return (
            f"lang={self.language} n={self.n} accuracy={self.accuracy:.2f} "
            f"recall={self.recall:.2f} false_escalation={self.false_escalation:.2f}"
        )


def evaluate(
    rows: Iterable[tuple[str, str, str]], *, backend: str | None = None
) -> dict[str, EvalResult]:
    """(label, language, text) rows scored with `backend`; a message escalates when it is
    labelled negative. The language given in the row is the one analysed."""
    rows = list(rows)
    sentiments = analyse_many(
        [text for _, _, text in rows], [lang for _, lang, _ in rows], backend=backend
    )
    results: dict[str, EvalResult] = {}
    for (label, language, text), sentiment in zip(rows, sentiments, strict=True):
        result = results.setdefault(language, EvalResult(language))
        result.n += 1
        result.fallbacks += sentiment.backend != backend_name(backend)
        result.correct += sentiment.label == label
        escalated = sentiment.label == NEGATIVE
        if label == NEGATIVE:
            result.negatives += 1
            result.negatives_escalated += escalated
        else:
            result.others += 1
            result.others_escalated += escalated
        if sentiment.label != label:
            result.confusions.append((label, sentiment.label, sentiment.score, text))
    return dict(sorted(results.items()))
