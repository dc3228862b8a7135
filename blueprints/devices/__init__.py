from flask import Blueprint

bp = Blueprint("devices", __name__, url_prefix="/devices")

from blueprints.devices import routes  # noqa: E402,F401
