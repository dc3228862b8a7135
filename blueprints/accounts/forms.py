from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField
from wtforms.validators import DataRequired, Length, ValidationError

from services.accounts import AccountError, normalize_email


def email_address(form, field) -> None:
    """The same rule as `flask users create`: an address it accepts can sign in here."""
    try:
        normalize_email(field.data)
    except AccountError as exc:
        raise ValidationError(str(exc)) from exc


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=320), email_address])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])
    remember = BooleanField("Keep me signed in")
