from urllib.parse import urlsplit

from flask import flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from blueprints.accounts import bp
from blueprints.accounts.forms import LoginForm
from events.outbox import emit
from extensions import db
from services.accounts import authenticate, record_failed_login


def _safe_next(target: str | None) -> str:
    # Only same-site paths: never an absolute URL or a scheme-relative one.
    if target and target.startswith("/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("dashboard.home")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.home"))
    form = LoginForm()
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
        login_user(user, remember=form.remember.data)
        return redirect(_safe_next(request.args.get("next")), code=303)
    return render_template("accounts/login.html", form=form)


@bp.post("/logout")
@login_required
def logout():
    logout_user()
    flash("You are signed out.", "info")
    return redirect(url_for("accounts.login"), code=303)
