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
