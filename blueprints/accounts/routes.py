import logging

from flask import flash, g, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from blueprints import safe_next
from blueprints.accounts import bp
from blueprints.accounts.forms import LoginForm
from events.outbox import emit
from extensions import db
from services.accounts import (
    authenticate,
    end_all_sessions,
    login_attempt_allowed,
    record_failed_login,
)

logger = logging.getLogger("switchboard.accounts")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.home"))
    form = LoginForm()
    if request.method == "POST":
        decision = login_attempt_allowed(request.remote_addr, request.form.get("email", ""))
        if not decision.allowed:
            logger.warning("sign-in throttled for %s", request.remote_addr)
            minutes = -(-decision.retry_after // 60)
            flash(
                "Too many sign-in attempts. "
                f"Wait {minutes} minute{'s' if minutes != 1 else ''} and try again.",
                "error",
            )
            page = render_template("accounts/login.html", form=form)
            return page, 429, {"Retry-After": str(decision.retry_after)}
    if form.validate_on_submit():
        user = authenticate(form.email.data, form.password.data)
        if user is None:
            record_failed_login(form.email.data)
            db.session.commit()
            flash("Wrong email or password.", "error")
            return render_template("accounts/login.html", form=form), 401
        emit(
            "user.logged_in",
            tenant_id=user.tenant_id,
            entity="user",
            entity_id=user.id,
            actor_user_id=user.id,
            payload={"label": user.email},
        )
        db.session.commit()
        # A new session for the signed-in user: nothing from before (a planted session, a
        # CSRF token read on a shared screen) carries over.
        session.clear()
        g.pop("csrf_token", None)
        login_user(user, remember=form.remember.data)
        return redirect(safe_next(request.args.get("next")), code=303)
    return render_template("accounts/login.html", form=form)


@bp.post("/logout")
@login_required
def logout():
    # Server-side: a copy of this session or of the remember cookie is dead too. The session
    # version is per user, so this signs the user out on their other devices as well.
    end_all_sessions(current_user)
    db.session.commit()
    session.clear()
    logout_user()  # after clear(): it leaves the order to delete the remember cookie
    flash("You are signed out.", "info")
    return redirect(url_for("accounts.login"), code=303)


@bp.post("/account/on-duty")
@login_required
def set_on_duty():
    """On duty: this user receives the tenant's chat escalations (services.chats)."""
    current_user.on_duty = request.form.get("on") == "1"
    db.session.commit()
    flash(
        "You are on duty: chat escalations reach you."
        if current_user.on_duty
        else "You are off duty: chat escalations no longer reach you.",
        "info",
    )
    return redirect(url_for("accounts.account"), code=303)
