"""Per-user API tokens: shown once, stored only as a SHA-256 hash; and the API's rate limits."""

from __future__ import annotations

import hashlib
import secrets

from flask import current_app
from sqlalchemy import select

from extensions import db
from models.accounts import User
from services.kv import RateDecision, kv

PREFIX = "sb_"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(user: User) -> str:
    """A new token for the user (the old one stops working)."""
    token = PREFIX + secrets.token_urlsafe(32)
    user.api_token_hash = _digest(token)
    return token


def revoke_token(user: User) -> None:
    user.api_token_hash = None


def user_for_token(token: str) -> User | None:
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    user = db.session.scalar(select(User).where(User.api_token_hash == _digest(token)))
    return user if user is not None and user.is_active else None


def api_hit_by_address(client_ip: str | None) -> RateDecision:
    """Count one API request from this client address (before its token is even checked, so
    guessing tokens is throttled too)."""
    return kv().hit(f"api:ip:{client_ip or '-'}", *current_app.config["API_RATE_LIMIT_PER_IP"])


def api_hit_by_user(user: User) -> RateDecision:
    """Count one API request for this user, however it authenticated: a user has one token,
    so this is the per-token limit, and the console session shares it."""
    return kv().hit(f"api:user:{user.id}", *current_app.config["API_RATE_LIMIT_PER_TOKEN"])
