"""The consumer a Channels dashboard would have: it joins the "devices" group and forwards
each rendered fragment it is given to its socket, unchanged."""

from channels.generic.websocket import AsyncWebsocketConsumer

GROUP = "devices"
# The bench's clients count their first message as the page's snapshot (ready to measure).
SNAPSHOT = '<div id="device-grid"></div>'


class DevicesConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        # Joined before the snapshot goes out: a client that has it gets every later frame.
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self.send(text_data=SNAPSHOT)

    async def disconnect(self, code):
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def fragment_push(self, event):
        await self.send(text_data=event["html"])
