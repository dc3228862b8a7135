from flask import Blueprint

bp = Blueprint("search", __name__)

from blueprints.search import routes  # noqa: E402,F401
