from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, SelectField, StringField
from wtforms.validators import DataRequired, Length, NumberRange, Optional


class LocationForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    alert_on_offline = BooleanField("Alert admins when a device here goes offline")
    maintenance_mode = BooleanField("Maintenance (no alerts)")


class ManufacturerForm(FlaskForm):
    code = StringField("Code", validators=[DataRequired(), Length(max=32)])
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])


class EndpointForm(FlaskForm):
    manufacturer_id = SelectField("Service", coerce=int)
    host = StringField("Receiver host", validators=[DataRequired(), Length(max=255)])
    port = IntegerField("Port", default=2202, validators=[NumberRange(1, 65535)])
    location_id = SelectField("Location", coerce=int, validators=[Optional()])


class DeviceForm(FlaskForm):
    manufacturer_id = SelectField("Manufacturer", coerce=int)
    api_device_id = StringField(
        "Device id (as the manufacturer reports it)", validators=[DataRequired(), Length(max=120)]
    )
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    kind = SelectField("Kind", choices=[("receiver", "Receiver"), ("transmitter", "Transmitter")])
    model = StringField("Model", validators=[Length(max=120)])
    location_id = SelectField("Location", coerce=int, validators=[Optional()])
