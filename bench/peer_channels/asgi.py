"""The peer's ASGI application: one WebSocket route, /ws/devices/."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import path  # noqa: E402

http = get_asgi_application()  # sets Django up before the consumer module is imported

from consumers import DevicesConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter([path("ws/devices/", DevicesConsumer.as_asgi())]),
    }
)
