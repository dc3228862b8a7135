from flask import Blueprint

bp = Blueprint("chats", __name__, url_prefix="/chats")

from blueprints.chats import canned, csat, escalation, identity, routes  # noqa: E402,F401
