from flask_wtf import FlaskForm
from wtforms import StringField, TextAreaField
from wtforms.validators import DataRequired, Length

MAX_PROMPT = 4000


class ProjectForm(FlaskForm):
    name = StringField(
        "Name",
        validators=[
            DataRequired("Enter a name for the project."),
            Length(max=120, message="The name can be at most 120 characters."),
        ],
    )
    description = TextAreaField(
        "Description",
        validators=[Length(max=2000, message="The description can be at most 2000 characters.")],
    )


class GenerateForm(FlaskForm):
    prompt = TextAreaField(
        "Describe the project to generate",
        validators=[
            DataRequired("Describe the project to generate."),
            Length(
                max=MAX_PROMPT,
                message=f"The description can be at most {MAX_PROMPT} characters: shorten it.",
            ),
        ],
    )
