"""WebSocket routes (flask-sock). /ws/live relays tenant-scoped live topics to pages."""

from blueprints.live.chat import register_chat_routes
from blueprints.live.routes import register_live_routes as _register_live


def register_live_routes(app) -> None:
    _register_live(app)
    register_chat_routes(app)


__all__ = ["register_live_routes"]
