from flask import Blueprint

bp = Blueprint("metrics", __name__, url_prefix="/metrics")

from blueprints.metrics import routes  # noqa: E402,F401
