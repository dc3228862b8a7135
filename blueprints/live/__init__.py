"""WebSocket routes (flask-sock). /ws/live relays tenant-scoped live topics to pages."""

from blueprints.live.routes import register_live_routes

__all__ = ["register_live_routes"]
