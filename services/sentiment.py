"""Sentiment of visitor messages: VADER by default, the LLM when SENTIMENT_BACKEND=llm."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from flask import current_app

log = logging.getLogger(__name__)

POSITIVE, NEUTRAL, NEGATIVE = "positive", "neutral", "negative"


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float  # -1 (very negative) .. 1 (very positive)
    backend: str


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def label_for(score: float, threshold: float) -> str:
    if score <= -threshold:
        return NEGATIVE
    if score >= threshold:
        return POSITIVE
    return NEUTRAL


def vader(text: str, threshold: float = 0.05) -> Sentiment:
    score = float(_vader().polarity_scores(text or "")["compound"])
    return Sentiment(label_for(score, threshold), round(score, 4), "vader")


def _llm(text: str, threshold: float) -> Sentiment:
    from services.assistant import client_or_none

    client = client_or_none()
    if client is None:
        return vader(text, threshold)
    response = client.chat.completions.create(
        model=current_app.config["OPENAI_MODEL"],
        temperature=0,
        max_tokens=20,
        messages=[
            {
                "role": "system",
                "content": "Rate the sentiment of the user's message. Answer with JSON only: "
                '{"score": <number from -1 (very negative) to 1 (very positive)>}',
            },
            {"role": "user", "content": text[:4000]},
        ],
    )
    raw = response.choices[0].message.content or ""
    try:
        score = max(-1.0, min(1.0, float(json.loads(raw)["score"])))
    except (ValueError, KeyError, TypeError):
        log.warning("LLM sentiment answer was not JSON (%r); using VADER", raw[:80])
        return vader(text, threshold)
    return Sentiment(label_for(score, threshold), round(score, 4), "llm")


def analyse(text: str) -> Sentiment:
    cfg = current_app.config
    threshold = cfg.get("SENTIMENT_THRESHOLD", 0.05)
    if cfg.get("SENTIMENT_BACKEND", "vader") == "llm":
        try:
            return _llm(text, threshold)
        except Exception as exc:  # noqa: BLE001 - a provider error must not lose the analysis
            log.warning("LLM sentiment failed (%s); using VADER", exc)
    return vader(text, threshold)
