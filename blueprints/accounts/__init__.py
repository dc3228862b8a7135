from flask import Blueprint

bp = Blueprint("accounts", __name__)

from blueprints.accounts import routes, tokens  # noqa: E402,F401
