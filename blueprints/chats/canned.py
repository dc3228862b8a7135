"""Canned replies: a tenant's stock answers, inserted in the reply box by "/shortcut".

Admins manage them (every POST is CSRF-checked by the app's CSRFProtect); every operator of
the tenant uses them. Another tenant's replies are a 404, never shown or filled in.
"""

import re

from flask import flash, redirect, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Regexp

from blueprints import admin_required, get_owned_or_404, render
from blueprints.chats import bp
from blueprints.chats.forms import OperatorReplyForm
from extensions import db
from models.chats import CannedReply, Chat

SHORTCUT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class CannedReplyForm(FlaskForm):
    shortcut = StringField(
        "Shortcut (typed after “/”)",
        validators=[
            DataRequired("Give it a shortcut."),
            Regexp(
                SHORTCUT.pattern,
                message="Use 1–40 lower-case letters, digits, “-” or “_”, e.g. refund-policy.",
            ),
        ],
        filters=[lambda value: (value or "").strip().lstrip("/").lower()],
    )
    content = TextAreaField(
        "Reply text", validators=[DataRequired("Write the reply."), Length(max=4000)]
    )


def tenant_canned_replies(tenant_id: int) -> list[CannedReply]:
    return list(
        db.session.scalars(
            select(CannedReply)
            .where(CannedReply.tenant_id == tenant_id)
            .order_by(CannedReply.shortcut)
        )
    )


def _taken(form: CannedReplyForm, except_id: int | None = None) -> bool:
    other = db.session.scalar(
        select(CannedReply.id).where(
            CannedReply.tenant_id == current_user.tenant_id,
            CannedReply.shortcut == form.shortcut.data,
        )
    )
    if other is not None and other != except_id:
        form.shortcut.errors = [f"/{form.shortcut.data} is already a canned reply."]
        return True
    return False


def _page(form: CannedReplyForm, status: int = 200, editing: CannedReply | None = None):
    response = render(
        "chats/canned.html",
        form=form,
        editing=editing,
        replies=tenant_canned_replies(current_user.tenant_id),
    )
    response.status_code = status
    return response


@bp.get("/canned")
@admin_required
def canned_replies():
    return _page(CannedReplyForm(formdata=None))


@bp.post("/canned")
@admin_required
def add_canned_reply():
    form = CannedReplyForm()
    if not form.validate_on_submit() or _taken(form):
        return _page(form, 400)
    db.session.add(
        CannedReply(
            tenant_id=current_user.tenant_id,
            shortcut=form.shortcut.data,
            content=form.content.data.strip(),
        )
    )
    db.session.commit()
    flash(f"Canned reply /{form.shortcut.data} added.", "info")
    return redirect(url_for("chats.canned_replies"), code=303)


@bp.route("/canned/<int:canned_id>", methods=["GET", "POST"])
@admin_required
def edit_canned_reply(canned_id: int):
    canned = get_owned_or_404(CannedReply, canned_id)
    if request.method == "GET":
        return _page(CannedReplyForm(obj=canned, formdata=None), editing=canned)
    form = CannedReplyForm()
    if not form.validate_on_submit() or _taken(form, except_id=canned.id):
        return _page(form, 400, editing=canned)
    canned.shortcut = form.shortcut.data
    canned.content = form.content.data.strip()
    db.session.commit()
    flash(f"Canned reply /{canned.shortcut} saved.", "info")
    return redirect(url_for("chats.canned_replies"), code=303)


@bp.post("/canned/<int:canned_id>/delete")
@admin_required
def delete_canned_reply(canned_id: int):
    canned = get_owned_or_404(CannedReply, canned_id)
    shortcut = canned.shortcut
    db.session.delete(canned)
    db.session.commit()
    flash(f"Canned reply /{shortcut} deleted.", "info")
    return redirect(url_for("chats.canned_replies"), code=303)


@bp.get("/<int:chat_id>/reply-box")
@login_required
def canned_fill(chat_id: int):
    """The reply box again, with "/shortcut" replaced by its canned text (htmx, as one types).

    Nothing changes (204, no swap) unless the box holds exactly a known shortcut, so the
    operator's own typing is never replaced.
    """
    chat = get_owned_or_404(Chat, chat_id)
    typed = (request.args.get("content") or "").strip()
    if not typed.startswith("/") or not SHORTCUT.match(typed[1:].lower()):
        return "", 204
    content = db.session.scalar(
        select(CannedReply.content).where(
            CannedReply.tenant_id == current_user.tenant_id,
            CannedReply.shortcut == typed[1:].lower(),
        )
    )
    if content is None:
        return "", 204
    form = OperatorReplyForm(formdata=None, data={"content": content})
    return render("chats/_reply_box.html", chat=chat, form=form)


@bp.app_template_global()
def canned_shortcuts() -> list[str]:
    """The signed-in operator's tenant's shortcuts, for the reply box's hint."""
    if not current_user.is_authenticated:
        return []
    return [canned.shortcut for canned in tenant_canned_replies(current_user.tenant_id)]
