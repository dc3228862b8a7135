"""Accounts: creating users and tenants, checking passwords."""

from __future__ import annotations

from sqlalchemy import func, select

from extensions import db
from models.accounts import ROLES, Tenant, User
from models.base import utcnow


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


def create_user(
    email: str, password: str, tenant: Tenant, role: str = "agent", name: str = ""
) -> User:
    email = email.strip().lower()
    if "@" not in email or len(email) > 254:
        raise AccountError(f"{email!r} is not an email address.")
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
    user = db.session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None or not user.is_active or not user.check_password(password):
        return None
    user.last_login_at = utcnow()
    return user


def record_failed_login(email: str) -> None:
    """Add a `user.login_failed` event when the email belongs to a user (for their tenant's
    audit trail). Unknown emails leave no trace: there is no tenant to show them to."""
    from events.outbox import emit

    user = db.session.scalar(select(User).where(User.email == (email or "").strip().lower()))
    if user is not None:
        emit(
            "user.login_failed",
            tenant_id=user.tenant_id,
            entity="user",
            entity_id=user.id,
            payload={"label": user.email},
        )
