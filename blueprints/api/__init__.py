"""JSON API v2: devices and activity logs, with an OpenAPI document that matches it."""

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v2")

from blueprints.api import routes  # noqa: E402,F401
