"""Per-user API tokens: shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from extensions import db
from models.accounts import User

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
