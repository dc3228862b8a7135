"""Accounts: creating users and tenants, checking passwords, sessions and sign-in limits."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

from email_validator import EmailNotValidError, validate_email
from flask import current_app
from sqlalchemy import func, select

from extensions import db
from models.accounts import ROLES, Tenant, User
from models.base import utcnow
from services.kv import RateDecision, kv


class AccountError(ValueError):
    """Bad input for an account operation; the message is fit to show a person."""


def get_or_create_tenant(name: str) -> Tenant:
    name = name.strip()
    if not name:
        raise AccountError("A tenant needs a name.")
    tenant = db.session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        db.session.add(tenant)
        db.session.flush()
    return tenant


def normalize_email(email: str) -> str:
    """The one definition of an email address, for `flask users create` and the login form:
    syntax only (no DNS), and `.test` domains allowed for demos and tests. The other
    special-use names (`.local`, `localhost`, …) are refused by both alike."""
    raw = (email or "").strip()
    try:
        checked = validate_email(raw, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise AccountError(f"{raw[:254]!r} is not a valid email address: {exc}") from exc
    if len(checked.normalized) > 254:
        raise AccountError(f"{raw[:254]!r} is not a valid email address: it is too long.")
    return checked.normalized.lower()


def user_by_email(email: str) -> User | None:
    try:
        email = normalize_email(email)
    except AccountError:
        return None
    return db.session.scalar(select(User).where(User.email == email))


def create_user(
    email: str, password: str, tenant: Tenant, role: str = "agent", name: str = ""
) -> User:
    email = normalize_email(email)
    if role not in ROLES:
        raise AccountError(f"Role must be one of: {', '.join(ROLES)}.")
    if len(password) < 8:
        raise AccountError("A password needs at least 8 characters.")
    exists = db.session.scalar(select(func.count()).select_from(User).where(User.email == email))
    if exists:
        raise AccountError(f"A user with email {email} already exists.")
    user = User(email=email, tenant_id=tenant.id, role=role, name=name or email.split("@")[0])
    user.set_password(password)
    db.session.add(user)
    db.session.flush()
    return user


def authenticate(email: str, password: str) -> User | None:
    user = user_by_email(email)
    if user is None or not user.is_active or not user.check_password(password):
        return None
    user.last_login_at = utcnow()
    # A new login gets cookies of its own, even when this object was loaded before (the
    # identity map can hand back one that carries an earlier session's identity).
    user.login_identity = new_session_identity(user)
    return user


def record_failed_login(email: str) -> None:
    """Add a `user.login_failed` event when the email belongs to a user (for their tenant's
    audit trail). Unknown emails leave no trace: there is no tenant to show them to."""
    from events.outbox import emit

    user = user_by_email(email)
    if user is not None:
        emit(
            "user.login_failed",
            tenant_id=user.tenant_id,
            entity="user",
            entity_id=user.id,
            payload={"label": user.email},
        )


# ---------------------------------------------------------------- sessions
#
# A session and a remember cookie carry "<user id>:<session version>:<issued at>:<nonce>"
# (Flask-Login's alternative id). The version lets the server revoke every cookie of a user
# by bumping it; the issue time lets it refuse logins older than REMEMBER_COOKIE_DURATION
# even when a copied cookie has no expiry; the nonce makes each login's cookies differ.
# A login does not bump the version, so signing in on one device keeps the others signed in.


def new_session_identity(user: User) -> str:
    return f"{user.id}:{user.session_version}:{int(time.time())}:{secrets.token_urlsafe(12)}"


def user_for_session(identity: str, max_age: timedelta) -> User | None:
    """The active user a session or remember cookie names, unless it was revoked or is too
    old; None otherwise (Flask-Login then treats the request as anonymous)."""
    try:
        user_id, version, issued_at, _nonce = identity.split(":")
        user_id, version, issued_at = int(user_id), int(version), int(issued_at)
    except (AttributeError, ValueError):
        return None  # also sessions from before session versions: sign in again
    age = time.time() - issued_at
    if not (-60 <= age <= max_age.total_seconds()) or not 0 < user_id < 2**31:
        return None
    user = db.session.get(User, user_id)
    if user is None or not user.is_active or user.session_version != version:
        return None
    user.login_identity = identity
    return user


def end_all_sessions(user: User) -> None:
    """Sign the user out on every device: every session and remember cookie stops working."""
    user.session_version += 1


def set_active(user: User, active: bool) -> None:
    if not active:
        # Their cookies must stay dead if the account is ever turned back on.
        end_all_sessions(user)
    user.is_active_user = active


# ---------------------------------------------------------------- sign-in limits


def login_attempt_allowed(client_ip: str | None, email: str) -> RateDecision:
    """Count one sign-in attempt against the per-address and per-email limits; refused when
    either is used up. Every attempt counts, right or wrong, so a throttled attacker cannot
    tell a right password from a wrong one."""
    config = current_app.config
    by_ip = kv().hit(f"login:ip:{client_ip or '-'}", *config["LOGIN_LIMIT_PER_IP"])
    if not by_ip.allowed:
        return by_ip
    try:
        key = normalize_email(email)
    except AccountError:
        key = (email or "").strip().lower()[:254]
    if not key:
        return RateDecision(True)
    return kv().hit(f"login:email:{key}", *config["LOGIN_LIMIT_PER_EMAIL"])
