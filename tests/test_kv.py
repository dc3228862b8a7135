"""Shared flags: a reply's claim and its "being written" mark, in memory and in Redis."""

from __future__ import annotations

import time

import pytest

from services.kv import MemoryKV, RedisKV
from tests.conftest import redis_prefix


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryKV()
        return
    url = request.getfixturevalue("redis_url")
    prefix = redis_prefix()
    store = RedisKV(url, prefix)
    yield store
    keys = list(store.redis.scan_iter(match=prefix + "*"))
    if keys:
        store.redis.delete(*keys)


def test_one_writer_claims_and_learns_whether_a_reply_was_begun(store):
    # The first writer: the claim is its, and no earlier writer had begun the reply.
    assert store.claim_and_mark("claim:1", 0.3, "started:1", 60) is False
    assert store.has_flag("started:1")
    # A second writer while the first holds the claim gets nothing, and changes nothing.
    store.set_flag("started:1", ttl=0.001)
    time.sleep(0.01)
    assert store.claim_and_mark("claim:1", 0.3, "started:1", 60) is None
    assert not store.has_flag("started:1")
    # The first writer dies mid-reply: its claim runs out, its mark stays.
    store.set_flag("started:1", ttl=60)
    time.sleep(0.35)
    assert store.claim_and_mark("claim:1", 0.3, "started:1", 60) is True
    # Another message's reply is not affected.
    assert store.claim_and_mark("claim:2", 0.3, "started:2", 60) is False


def test_a_reply_longer_than_its_lease_keeps_it_until_released(store, monkeypatch):
    """One thread renews every reply's lease of a process: a reply that streams for longer
    than its lease must keep it (else the sweep would start a second writer), a lease added
    while the thread sleeps on longer ones must be renewed in time, and a released one must
    not be renewed again."""
    import tasks.chats
    from tasks.chats import ReplyLease

    monkeypatch.setattr(tasks.chats, "kv", lambda: store)
    long = ReplyLease("claim:long", 30.0)
    assert long.claim("started:long", 60) is False
    long.keep()  # the keeper now sleeps 10 s between rounds
    short = ReplyLease("claim:short", 0.6)
    assert short.claim("started:short", 60) is False
    short.keep()
    time.sleep(1.5)  # over twice the short lease
    assert store.claim_and_mark("claim:short", 0.6, "started:short", 60) is None  # still held
    short.release()
    long.release()
    time.sleep(0.01)  # (a released lease runs out in a millisecond)
    assert store.claim_and_mark("claim:short", 0.6, "started:short", 60) is True
    time.sleep(0.8)  # the released lease was not renewed by the keeper meanwhile
    assert store.claim_and_mark("claim:short", 0.6, "started:short", 60) is True


def test_receiver_leases_asked_for_together_are_each_taken_renewed_or_refused(store):
    import uuid

    from services.meters import Leases

    leases = Leases(store)
    mine, theirs, free = (f"shure:10.9.{uuid.uuid4().hex[:6]}:{n}" for n in range(3))
    assert leases.hold(theirs, "other-process", 5.0)
    assert leases.hold(mine, "this-process", 0.3)
    assert leases.hold_many([mine, theirs, free], "this-process", 5.0) == [True, False, True]
    time.sleep(0.4)  # the first ttl (0.3 s) would have run out: the renewal extended it
    assert leases.hold(mine, "other-process", 5.0) is False
    assert leases.hold_many([], "this-process", 5.0) == []


def test_limits_checked_together_stop_at_the_first_used_up_and_count_only_those_before(store):
    """A visitor's message passes its limits narrowest first, in one call: the first one used
    up refuses it, with how long to wait, and the wider ones after it are not counted (an
    address over its own limit must not use up its widget's ceiling for everyone else)."""
    checks = [("sender:a", 2, 60), ("ip:1", 3, 60), ("widget", 10, 60)]
    assert store.hit_all(checks) == (None, store.hit_all([])[1])
    assert store.hit_all(checks)[0] is None
    index, decision = store.hit_all(checks)  # the sender's third message in a minute
    assert index == 0 and not decision.allowed
    assert 58 <= decision.retry_after <= 60
    # Another visitor behind the same address: its own limit is fresh, the address has one
    # message left (the refused one above was not counted against it), then none.
    other = [("sender:b", 2, 60), ("ip:1", 3, 60), ("widget", 10, 60)]
    assert store.hit_all(other)[0] is None
    index, decision = store.hit_all(other)
    assert index == 1 and not decision.allowed
    # The widget counted the three messages that got through, not the two refused: seven
    # more from elsewhere, then the eighth is refused by the widget's limit.
    for n in range(7):
        assert store.hit_all([(f"sender:c{n}", 2, 60), ("widget", 10, 60)])[0] is None
    index, _ = store.hit_all([("sender:d", 2, 60), ("widget", 10, 60)])
    assert index == 1
    # hit() reads the same counts: the address is used up for it too, the widget as well.
    assert not store.hit("ip:1", 3, 60).allowed
    assert not store.hit("widget", 10, 60).allowed
    assert store.hit("sender:e", 2, 60).allowed


def test_a_limit_frees_up_as_its_hits_leave_the_window(store):
    assert store.hit_all([("burst", 2, 1)])[0] is None
    assert store.hit_all([("burst", 2, 1)])[0] is None
    index, decision = store.hit_all([("burst", 2, 1)])
    assert index == 0 and decision.retry_after == 1
    time.sleep(1.1)
    assert store.hit_all([("burst", 2, 1)])[0] is None


def test_limits_are_not_checked_while_redis_is_away():
    """As a single limit: with Redis unreachable, messages get through (unthrottled) rather
    than every chat failing until it is back."""
    store = RedisKV("redis://127.0.0.1:1/0", redis_prefix())
    assert store.hit_all([("sender:a", 1, 60), ("widget", 1, 60)]) == (None, store.hit("x", 1, 60))
