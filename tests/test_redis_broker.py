"""The production broker's consumers wake when a message is enqueued (real Redis)."""

from __future__ import annotations

import threading

import pytest
import redis
from dramatiq.message import Message

from tasks.redis_broker import WAKE_TOKENS_KEPT, WakingRedisBroker
from tests.conftest import redis_prefix

QUEUE = "wake-test"
# A consumer that has backed off this far would, polling, not look again for half a minute.
LONG_IDLE_MS = 60_000


@pytest.fixture
def broker(redis_url):
    namespace = redis_prefix().rstrip(":").replace(":", "-")
    broker = WakingRedisBroker(url=redis_url, namespace=namespace)
    broker.declare_queue(QUEUE)
    yield broker
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=namespace + ":*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    broker.close()
    broker.client.connection_pool.disconnect()


def _message(n: int) -> Message:
    return Message(queue_name=QUEUE, actor_name="noop", args=(n,), kwargs={}, options={})


def _backed_off_consumer(broker, prefetch: int = 1):
    consumer = broker.consume(QUEUE, prefetch=prefetch, timeout=LONG_IDLE_MS)
    consumer.misses = 30  # as after a long quiet spell: its next wait is the whole timeout
    return consumer


def _take_all(broker, count: int) -> list[int]:
    """Up to `count` messages' first arguments, each acked, until the queue looks empty."""
    consumer = broker.consume(QUEUE, prefetch=10, timeout=100)
    received: list[int] = []
    try:
        while len(received) < count:
            proxy = next(consumer)
            if proxy is None:
                break
            received.append(proxy.args[0])
            consumer.ack(proxy)
    finally:
        consumer.close()
    return received


def _next_message_in_thread(consumer, received: list, tries: int = 5) -> threading.Thread:
    def take() -> None:
        for _ in range(tries):
            proxy = next(consumer)
            if proxy is not None:
                received.append(proxy.args[0])
                consumer.ack(proxy)
                return

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread


def test_a_message_wakes_a_consumer_that_had_backed_off(broker):
    consumer = _backed_off_consumer(broker)
    received: list[int] = []
    # The consumer finds the queue empty and waits (up to a minute, were it polling).
    thread = _next_message_in_thread(consumer, received)
    thread.join(timeout=0.3)
    assert thread.is_alive() and received == []

    broker.enqueue(_message(7))
    thread.join(timeout=10)
    assert received == [7], "the enqueue did not wake the waiting consumer"
    consumer.close()


def test_a_busy_queue_keeps_few_tokens_and_every_message(broker):
    for n in range(100):
        broker.enqueue(_message(n))
    assert 1 <= broker.client.zcard(broker.wake_key(QUEUE)) <= WAKE_TOKENS_KEPT

    assert sorted(_take_all(broker, 100)) == list(range(100))


def test_a_consumer_with_full_prefetch_leaves_the_token_to_others(broker):
    busy = _backed_off_consumer(broker, prefetch=1)
    broker.enqueue(_message(1))
    first = next(busy)
    assert first is not None and first.args[0] == 1  # in progress, not acked

    broker.enqueue(_message(2))
    assert next(busy) is None  # full: neither fetched nor waited for a token
    assert broker.client.zcard(broker.wake_key(QUEUE)) >= 1

    idle = _backed_off_consumer(broker, prefetch=1)
    received: list[int] = []
    thread = _next_message_in_thread(idle, received)
    thread.join(timeout=10)
    assert received == [2]
    busy.ack(first)
    busy.close()
    idle.close()


class _CountingConnection(redis.Connection):
    """A real connection that counts its writes: one per round trip."""

    writes = 0

    def send_packed_command(self, command, check_health=True):
        type(self).writes += 1
        return super().send_packed_command(command, check_health)


def test_a_message_and_its_wake_up_token_go_in_one_round_trip(broker, redis_url):
    """A visitor's reply starts when the assistant's consumer wakes: the token must not
    wait for the enqueue's reply before it is sent."""
    import time

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_CountingConnection)
    counting = WakingRedisBroker(
        client=redis.Redis(connection_pool=pool), namespace=broker.namespace
    )
    counting.declare_queue(QUEUE)
    try:
        counting.enqueue(_message(1))  # loads the scripts
        time.sleep(0.01)
        before = _CountingConnection.writes
        counting.enqueue(_message(2))
        assert _CountingConnection.writes - before == 1
        assert counting.client.zcard(counting.wake_key(QUEUE)) >= 1
        assert sorted(_take_all(counting, 2)) == [1, 2]
    finally:
        pool.disconnect()


def test_a_message_is_stored_after_redis_forgot_its_scripts(broker):
    """SCRIPT FLUSH (or a Redis restart) between two enqueues: the message still arrives and
    still wakes a waiting consumer."""
    import time

    broker.enqueue(_message(1))
    consumer = _backed_off_consumer(broker)
    first = next(consumer)
    assert first is not None and first.args[0] == 1
    consumer.ack(first)
    broker.client.script_flush()
    time.sleep(0.01)
    consumer.misses = 30  # waits for a token again
    received: list[int] = []
    thread = _next_message_in_thread(consumer, received)
    thread.join(timeout=0.3)
    broker.enqueue(_message(2))
    thread.join(timeout=10)
    assert received == [2]
    consumer.close()
