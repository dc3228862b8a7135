from flask_wtf import FlaskForm
from wtforms import BooleanField, FloatField, IntegerField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, NumberRange, Optional


class OperatorReplyForm(FlaskForm):
    content = TextAreaField("Reply", validators=[DataRequired(), Length(max=4000)])


class AgentForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    provider = StringField(
        "Provider", default="openai", validators=[DataRequired(), Length(max=32)]
    )
    model = StringField(
        "Model", default="gpt-4o-mini", validators=[DataRequired(), Length(max=120)]
    )
    temperature = FloatField("Temperature", default=0.7, validators=[NumberRange(0, 2)])
    max_tokens = IntegerField("Max tokens", default=1000, validators=[NumberRange(1, 32000)])
    system_prompt = TextAreaField(
        "System prompt", default="You are a helpful assistant.", validators=[Length(max=8000)]
    )
    is_default = BooleanField("Default agent for new chats")
    is_active = BooleanField("Active", default=True)


class WidgetSettingsForm(FlaskForm):
    allowed_origins = TextAreaField(
        "Allowed origins (one per line, e.g. https://www.example.com)",
        validators=[Optional(), Length(max=2000)],
    )
