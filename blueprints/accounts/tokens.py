"""The user's own account page: the API token (shown once when issued) and signing out
on every device."""

from flask import flash, redirect, render_template, session, url_for
from flask_login import current_user, login_required, logout_user

from blueprints.accounts import bp
from extensions import db
from services.accounts import end_all_sessions
from services.api_tokens import issue_token, revoke_token


@bp.get("/account")
@login_required
def account():
    return render_template("accounts/account.html", new_token=None)


@bp.post("/account/token")
@login_required
def new_token():
    token = issue_token(current_user)
    db.session.commit()
    # Shown once, in this response only; the database keeps a hash.
    response = render_template("accounts/account.html", new_token=token)
    return response, 200, {"Cache-Control": "no-store"}


@bp.post("/account/token/revoke")
@login_required
def revoke():
    revoke_token(current_user)
    db.session.commit()
    flash("Your API token no longer works.", "info")
    return redirect(url_for("accounts.account"), code=303)


@bp.post("/account/sign-out-everywhere")
@login_required
def sign_out_everywhere():
    end_all_sessions(current_user)
    db.session.commit()
    session.clear()
    logout_user()
    flash("You are signed out on every device.", "info")
    return redirect(url_for("accounts.login"), code=303)
