"""Live handlers: every tenant event becomes a fragment on the tenant's feed topic."""

from __future__ import annotations

from events.registry import Event, handler
from services import feed
from services.live import publish_fragment_after_commit, tenant_topic


@handler("*", name="live_feed", max_retries=3, time_limit_ms=10_000)
def live_feed(event: Event) -> None:
    if event.tenant_id is None:
        return
    item = feed.describe(event)  # the event carries every field the feed shows
    # In a batch of events, rendered with the batch's other fragments just before it commits.
    publish_fragment_after_commit(
        tenant_topic(event.tenant_id, "feed"),
        f"feed-{event.id}",
        "dashboard/_feed_push.html",
        item=item,
    )
