from flask_wtf import FlaskForm
from wtforms import StringField, TextAreaField
from wtforms.validators import DataRequired, Length


class ProjectForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    description = TextAreaField("Description", validators=[Length(max=2000)])


class GenerateForm(FlaskForm):
    prompt = TextAreaField(
        "Describe the project to generate", validators=[DataRequired(), Length(max=4000)]
    )
