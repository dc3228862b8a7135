"""Tenants and the people who log in to them."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Optional

from flask_login import UserMixin
from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from extensions import db
from models.base import Timestamps, Tracked, UTCDateTime

ROLES = ("admin", "agent")


def new_widget_key() -> str:
    return "wk_" + secrets.token_urlsafe(24)


class Tenant(Timestamps, db.Model):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    widget_key: Mapped[str] = mapped_column(String(64), unique=True, default=new_widget_key)
    # Origins allowed to open the chat widget socket, one per line.
    allowed_origins: Mapped[str] = mapped_column(String(2000), default="")

    users: Mapped[list[User]] = relationship(back_populates="tenant")

    def __repr__(self) -> str:
        return f"<Tenant {self.id} {self.name!r}>"


class User(UserMixin, Tracked, Timestamps, db.Model):
    __tablename__ = "users"
    __entity__ = "user"
    # session_version is a credential's counter: a sign-out is not an edit anyone reviews.
    __event_exclude__ = frozenset({"password_hash", "api_token_hash", "session_version"})
    # A login is its own event (user.logged_in); the timestamp it stamps is not an edit.
    __event_routine__ = frozenset({"last_login_at"})
    __table_args__ = (CheckConstraint("role IN ('admin', 'agent')", name="role_valid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(120), default="")
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="agent")
    is_active_user: Mapped[bool] = mapped_column(Boolean, default=True)
    api_token_hash: Mapped[Optional[str]] = mapped_column(String(128), unique=True)
    last_login_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    # Every session and remember cookie names the version it was issued under; bumping it
    # (sign out, sign out everywhere, deactivation) makes all of them stop working.
    session_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # On duty: receives escalations of the tenant's chats (toggled on the account page).
    on_duty: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    tenant: Mapped[Tenant] = relationship(back_populates="users")

    # What this login's cookies carry (see services.accounts.session_identity); set when the
    # user is loaded from a session, so Flask-Login re-issues the same value.
    login_identity = None

    def session_identity(self) -> str:
        """Flask-Login's id_attribute (app.py): the value a session and a remember cookie
        carry. A new login gets a new one; a loaded session keeps its own."""
        from services.accounts import new_session_identity

        if self.login_identity is None:
            self.login_identity = new_session_identity(self)
        return self.login_identity

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    @property
    def is_active(self) -> bool:  # Flask-Login
        return self.is_active_user

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def feed_label(self) -> str:
        return self.email

    def __repr__(self) -> str:
        return f"<User {self.id} {self.email!r}>"
