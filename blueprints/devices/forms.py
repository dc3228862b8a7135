from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, SelectField, StringField, ValidationError
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from services.manufacturers.endpoints import checked_address
from services.manufacturers.shure_protocol import DEFAULT_PORT


class LocationForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    alert_on_offline = BooleanField("Alert admins when a device here goes offline")
    maintenance_mode = BooleanField("Maintenance (no alerts)")


class EndpointForm(FlaskForm):
    manufacturer_id = SelectField("Service", coerce=int)
    host = StringField("Receiver host", validators=[DataRequired(), Length(max=255)])
    port = IntegerField(
        "Port",
        default=DEFAULT_PORT,
        validators=[
            DataRequired("Enter a port between 1 and 65535."),
            NumberRange(1, 65535, "The port must be a number between 1 and 65535."),
        ],
    )
    location_id = SelectField("Location", coerce=int, validators=[Optional()])

    def validate_host(self, field) -> None:
        """Host syntax, and the device network policy for every address it resolves to."""
        port = self.port.data
        if not isinstance(port, int) or not 0 < port < 65536:
            port = DEFAULT_PORT  # the port field reports its own error
        try:
            field.data = checked_address(field.data or "", port)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class DeviceForm(FlaskForm):
    manufacturer_id = SelectField("Manufacturer", coerce=int)
    api_device_id = StringField(
        "Device id (as the manufacturer reports it)", validators=[DataRequired(), Length(max=120)]
    )
    name = StringField("Name", validators=[DataRequired(), Length(max=120)])
    kind = SelectField(
        "Kind",
        choices=[SelectChoice("receiver", "Receiver"), SelectChoice("transmitter", "Transmitter")],
    )
    model = StringField("Model", validators=[Length(max=120)])
    location_id = SelectField("Location", coerce=int, validators=[Optional()])


def fill_choices(form, manufacturers, locations) -> None:
    """The manufacturer and location choices of an endpoint or device form."""
    form.manufacturer_id.choices = [SelectChoice(m.id, m.name) for m in manufacturers]
    form.location_id.choices = [SelectChoice(0, "—")] + [
        SelectChoice(loc.id, loc.name) for loc in locations
    ]
