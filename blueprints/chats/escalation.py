"""Escalation phrases: the words that always bring a chat to the admins' attention.

Every POST here is CSRF-checked by the app's CSRFProtect; rules are the admin's tenant's only.
"""

from flask import flash, redirect, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import SelectField, StringField
from wtforms.validators import DataRequired, Length

from blueprints import admin_required, get_owned_or_404, render
from blueprints.chats import bp
from extensions import db
from models.chats import EscalationRule
from services import escalation


class EscalationRuleForm(FlaskForm):
    phrase = StringField(
        "Word or phrase",
        validators=[
            DataRequired("Type a word or phrase."),
            Length(max=escalation.MAX_PHRASE_LENGTH),
        ],
    )
    language = SelectField("Language", validate_choice=True)


def _form() -> EscalationRuleForm:
    form = EscalationRuleForm()
    form.language.choices = [
        (code, escalation.language_label(code)) for code in escalation.rule_languages()
    ]
    return form


def _page(form: EscalationRuleForm, status: int = 200):
    response = render(
        "chats/escalation_rules.html",
        form=form,
        rules=escalation.tenant_rules(current_user.tenant_id),
        language_label=escalation.language_label,
    )
    response.status_code = status
    return response


@bp.get("/escalation")
@admin_required
def escalation_rules():
    return _page(_form())


@bp.post("/escalation")
@admin_required
def add_escalation_rule():
    form = _form()
    if not form.validate_on_submit():
        return _page(form, 400)
    try:
        rule = escalation.add_rule(current_user.tenant_id, form.phrase.data, form.language.data)
    except escalation.EscalationRuleError as exc:
        form.phrase.errors = [str(exc)]
        return _page(form, 400)
    db.session.commit()
    flash(f"Messages with “{rule.phrase}” now escalate.", "info")
    return redirect(url_for("chats.escalation_rules"), code=303)


@bp.post("/escalation/suggested")
@admin_required
def add_suggested_escalation_rules():
    added = escalation.add_suggested_rules(current_user.tenant_id)
    db.session.commit()
    flash(f"Added {added} suggested phrases." if added else "You have them all already.", "info")
    return redirect(url_for("chats.escalation_rules"), code=303)


@bp.post("/escalation/<int:rule_id>/toggle")
@admin_required
def toggle_escalation_rule(rule_id: int):
    rule = get_owned_or_404(EscalationRule, rule_id)
    rule.is_active = not rule.is_active
    db.session.commit()
    return redirect(url_for("chats.escalation_rules"), code=303)


@bp.post("/escalation/<int:rule_id>/delete")
@admin_required
def delete_escalation_rule(rule_id: int):
    rule = get_owned_or_404(EscalationRule, rule_id)
    phrase = rule.phrase
    db.session.delete(rule)
    db.session.commit()
    flash(f"“{phrase}” no longer escalates.", "info")
    return redirect(url_for("chats.escalation_rules"), code=303)
