"""The peer's publisher: group_send of numbered device cards to "devices", paced.

Started by bench/bench_fanout.py with the peer's virtualenv and settings. Reads JSON lines on
stdin: first {"head": ..., "tail": ...} (a rendered card, split where the mark goes), then one
{"run": R, "count": N, "rate": F} per burst; each burst publishes N frames at F/s, each with
`id="device-card-fo{seq}" data-fo="{run}:{seq}:{stamp}"` (stamp: CLOCK_REALTIME ns just before
the group_send, as the Switchboard side stamps just before its XADD), and answers with one
JSON line {"first_ns", "last_ns", "sent"} (or {"error"}). Ends at the end of stdin.
"""

import asyncio
import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

import django  # noqa: E402

django.setup()

from channels.layers import get_channel_layer  # noqa: E402

GROUP = "devices"


def reply(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def burst(layer, head: str, tail: str, run: int, count: int, rate: float) -> dict:
    loop = asyncio.get_running_loop()
    first = last = sent = 0
    start = loop.time()
    for seq in range(count):
        delay = start + seq / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stamp = time.time_ns()
        mark = f'id="device-card-fo{seq}" data-fo="{run}:{seq}:{stamp}"'
        await layer.group_send(GROUP, {"type": "fragment.push", "html": head + mark + tail})
        first = first or stamp
        last = stamp
        sent += 1
    return {"first_ns": first, "last_ns": last, "sent": sent}


async def main() -> None:
    loop = asyncio.get_running_loop()
    layer = get_channel_layer()
    card = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if card is None:
            card = command["head"], command["tail"]
            reply({"ready": True})
            continue
        try:
            answer = await burst(layer, *card, command["run"], command["count"], command["rate"])
        except Exception as exc:  # noqa: BLE001 - reported to the bench, which fails the step
            answer = {"error": repr(exc)}
        reply(answer)
    await layer.flush()


if __name__ == "__main__":
    asyncio.run(main())
