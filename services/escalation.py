"""When a visitor message escalates to the tenant's admins, and why.

Two reasons, checked in this order: one of the tenant's escalation phrases appears in the
message ("phrase: reembolso"), or its sentiment is negative ("negative −0.72"). Phrases match
whole words, without regard to case or accents ("reclamação" matches "reclamacao"), in the
message's language or in any language.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from extensions import db
from models.chats import ANY_LANGUAGE, EscalationRule, Message
from services.lexicons import normalise
from services.sentiment import LANGUAGE_NAMES, NEGATIVE, Sentiment, configured_languages

MAX_PHRASE_LENGTH = 200
MAX_RULES_PER_TENANT = 500
# What admins are offered with one click: phrases customers use when they mean to leave,
# want money back or threaten to complain to an authority.
SUGGESTED_RULES = (
    ("en", "cancel my account"),
    ("en", "refund"),
    ("en", "lawyer"),
    ("en", "chargeback"),
    ("es", "reembolso"),
    ("es", "hoja de reclamaciones"),
    ("es", "abogado"),
    ("es", "darme de baja"),
    ("pt", "reembolso"),
    ("pt", "advogado"),
    ("pt", "procon"),
    ("pt", "reclame aqui"),
    ("pt", "quero cancelar"),
)

_WORD = re.compile(r"\w+")


class EscalationRuleError(ValueError):
    pass


def _words(text: str) -> str:
    return " ".join(_WORD.findall(normalise(text)))


def clean_phrase(raw: str) -> str:
    """The phrase as stored: trimmed, single spaces, lower case (accents kept for display)."""
    return " ".join((raw or "").split()).lower()


def rule_languages() -> list[str]:
    return [ANY_LANGUAGE, *configured_languages()]


def language_label(code: str) -> str:
    return "Any language" if code == ANY_LANGUAGE else LANGUAGE_NAMES.get(code, code)


def tenant_rules(tenant_id: int) -> list[EscalationRule]:
    return list(
        db.session.scalars(
            select(EscalationRule)
            .where(EscalationRule.tenant_id == tenant_id)
            .order_by(EscalationRule.language, EscalationRule.phrase)
        )
    )


def add_rule(tenant_id: int, phrase: str, language: str) -> EscalationRule:
    phrase = clean_phrase(phrase)
    if not _words(phrase):
        raise EscalationRuleError("Type a word or phrase (letters or digits).")
    if len(phrase) > MAX_PHRASE_LENGTH:
        raise EscalationRuleError(f"A phrase can be at most {MAX_PHRASE_LENGTH} characters.")
    if language not in rule_languages():
        raise EscalationRuleError("Choose one of the listed languages.")
    existing = tenant_rules(tenant_id)
    if len(existing) >= MAX_RULES_PER_TENANT:
        raise EscalationRuleError(f"A tenant can have at most {MAX_RULES_PER_TENANT} phrases.")
    for rule in existing:
        if rule.language == language and _words(rule.phrase) == _words(phrase):
            raise EscalationRuleError(f"“{rule.phrase}” is already a phrase for this language.")
    rule = EscalationRule(tenant_id=tenant_id, phrase=phrase, language=language, is_active=True)
    db.session.add(rule)
    db.session.flush()
    return rule


def add_suggested_rules(tenant_id: int) -> int:
    """Add the suggested phrases the tenant does not have yet; how many were added."""
    have = {(rule.language, _words(rule.phrase)) for rule in tenant_rules(tenant_id)}
    added = 0
    for language, phrase in SUGGESTED_RULES:
        if language in rule_languages() and (language, _words(phrase)) not in have:
            add_rule(tenant_id, phrase, language)
            added += 1
    return added


def matching_phrase(tenant_id: int, text: str, language: str | None) -> str | None:
    """The first active phrase of the tenant's found in `text`, as the admin wrote it."""
    languages = [ANY_LANGUAGE] + ([language] if language else [])
    rules = db.session.scalars(
        select(EscalationRule)
        .where(
            EscalationRule.tenant_id == tenant_id,
            EscalationRule.is_active.is_(True),
            EscalationRule.language.in_(languages),
        )
        .order_by(EscalationRule.id)
    )
    padded = f" {_words(text)} "
    for rule in rules:
        words = _words(rule.phrase)
        if words and f" {words} " in padded:
            return rule.phrase
    return None


def format_score(score: float) -> str:
    return f"{score:.2f}".replace("-", "\u2212")  # a real minus sign, as people write it


def escalation_reason(message: Message, sentiment: Sentiment) -> str | None:
    phrase = matching_phrase(message.tenant_id, message.content, sentiment.language)
    if phrase is not None:
        return f"phrase: {phrase}"[:200]
    if sentiment.label == NEGATIVE:
        return f"negative {format_score(sentiment.score)}"
    return None


def analysis_burst(message: Message, limit: int) -> list[Message]:
    """`message` and the visitor messages that followed it in its chat and still wait for
    analysis (a burst typed before the first was analysed), oldest first, locked so that
    concurrent handlers split them instead of analysing one twice. Empty when another
    handler holds `message` already."""
    rows = list(
        db.session.scalars(
            select(Message)
            .where(
                Message.chat_id == message.chat_id,
                Message.id >= message.id,
                Message.sender == "visitor",
                Message.sentiment_label.is_(None),
            )
            .order_by(Message.id)
            .limit(max(1, limit))
            .with_for_update(skip_locked=True)
        )
    )
    if message not in rows:
        return []
    return rows
