"""Live handlers: every tenant event becomes a fragment on the tenant's feed topic."""

from __future__ import annotations

from events.registry import Event, handler
from services import feed
from services.live import publish_after_commit, render_fragment, tenant_topic


@handler("*", name="live_feed", max_retries=3, time_limit_ms=10_000)
def live_feed(event: Event) -> None:
    if event.tenant_id is None:
        return
    item = feed.describe(event)  # the event carries every field the feed shows
    html = render_fragment("dashboard/_feed_push.html", item=item)
    publish_after_commit(tenant_topic(event.tenant_id, "feed"), f"feed-{event.id}", html=html)
