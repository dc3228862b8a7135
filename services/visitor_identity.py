"""Who a widget visitor is, as the embedding site says (Chatwoot-style identity validation).

The site may pass a name, an email and its own user identifier through the widget's
`Switchboard.identify()`. Name and email alone are shown to operators marked "unverified";
an identifier is accepted only with `identifier_hash` = HMAC-SHA256(identity secret,
identifier) in hex, which only the site's server can compute. A verified identity makes the
name and email trusted, and an unverified one never replaces it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from flask import current_app

from models.chats import Chat

MAX_NAME = 120
MAX_EMAIL = 254
MAX_IDENTIFIER = 128
_EMAIL = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


class IdentityRefused(Exception):
    """An identifier came with a missing or wrong hash: it is not used."""


@dataclass(frozen=True)
class Identity:
    name: str | None = None
    email: str | None = None
    identifier: str | None = None
    verified: bool = False

    @property
    def empty(self) -> bool:
        return not (self.name or self.email or self.identifier)


def identity_secret(tenant_id: int) -> str:
    """The tenant's signing secret, derived from SECRET_KEY (rotating that rotates it)."""
    key = current_app.config["SECRET_KEY"]
    key = key.encode() if isinstance(key, str) else key
    return hmac.new(key, f"widget-identity:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def identifier_hash(tenant_id: int, identifier: str) -> str:
    secret = identity_secret(tenant_id).encode()
    return hmac.new(secret, identifier.encode(), hashlib.sha256).hexdigest()


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    # Control and format characters (newlines, bidi overrides) would let a name pose as
    # something else in the console.
    value = "".join(c for c in value if unicodedata.category(c)[0] != "C")
    value = " ".join(value.split())[:limit]
    return value or None


def parse_identity(tenant_id: int, data: Any) -> Identity:
    """The identity in a frame's `identity` object; IdentityRefused for a bad signature."""
    if not isinstance(data, dict):
        return Identity()
    name = _text(data.get("name"), MAX_NAME)
    email = _text(data.get("email"), MAX_EMAIL)
    if email and not _EMAIL.match(email):
        email = None
    identifier = _text(data.get("identifier"), MAX_IDENTIFIER)
    if identifier is None:
        return Identity(name=name, email=email)
    given = data.get("identifier_hash")
    expected = identifier_hash(tenant_id, identifier)
    if not (isinstance(given, str) and hmac.compare_digest(given.lower(), expected)):
        raise IdentityRefused(Identity(name=name, email=email))
    return Identity(name=name, email=email, identifier=identifier, verified=True)


def apply_identity(chat: Chat, identity: Identity) -> bool:
    """Record `identity` on the chat; False when it was not (an unverified one over a verified)."""
    if identity.empty:
        return False
    if chat.identity_verified and not identity.verified:
        return False
    chat.visitor_name = identity.name
    chat.visitor_email = identity.email
    chat.visitor_identifier = identity.identifier
    chat.identity_verified = identity.verified
    return True
