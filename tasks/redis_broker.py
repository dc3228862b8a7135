"""Dramatiq's RedisBroker with consumers that wake when a message is enqueued.

Dramatiq's Redis consumers poll: a consumer that finds its queue empty sleeps, backing off up to
the worker timeout, so a message sent to an idle queue waits for the next poll (on average a
good part of that timeout), and twenty idle consumers per worker process keep asking Redis.

Here every enqueue also adds a wake-up token to a small per-queue sorted set, and a consumer
that found nothing waits on it with BZPOPMIN for as long as it would have slept. A message sent
to an idle queue wakes one waiting consumer at once; without messages the consumers still fetch
at least once per worker timeout (heartbeats, maintenance and messages requeued by Dramatiq's
own scripts keep working as before). Tokens are hints, never the messages themselves: a token
with no message behind it costs one empty fetch. A token is one of WAKE_TOKENS_KEPT names, so
the set never holds more than that however busy the queue, and a process adds at most one per
queue every WAKE_AGAIN_AFTER_S, so a burst of sends costs one extra command, not one each. The
token goes in the same round trip as the message (do_enqueue), not after its reply.
"""

from __future__ import annotations

import random
import time

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import Middleware

#: Most tokens a queue's wake-up set holds. A worker process has one consumer per queue, so
#: this wakes a consumer in each of as many processes; more would only cause empty fetches.
WAKE_TOKENS_KEPT = 16

#: A process adds at most one token per queue in this time: a burst of sends (a commit's
#: events, a bulk job) costs one ZADD, not one per message.
WAKE_AGAIN_AFTER_S = 0.002

#: How often a consumer whose prefetched messages are all in progress looks again.
FULL_PREFETCH_RECHECK_S = 0.005


class WakingRedisBroker(RedisBroker):
    """A RedisBroker whose enqueue wakes an idle consumer of the queue (see the module doc)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._woken: dict[str, float] = {}  # queue -> when this process last added a token

    @property
    def consumer_class(self):
        return _WakingConsumer

    def wake_key(self, queue_name: str) -> str:
        return f"{self.namespace}:{queue_name}.wake"

    def do_enqueue(self, queue_name: str, redis_message_id: str, data: bytes):
        """Dramatiq's enqueue (its `dispatch` script, as RedisBroker.enqueue calls it), sent in
        one round trip with the queue's wake-up token: the token after the message, so the
        consumer it wakes finds the message. Sent one after the other, the token waited for
        the script's reply, and the consumer for the token (a visitor's reply starts a round
        trip sooner)."""
        script = self.scripts["dispatch"]
        args = [
            "enqueue",
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance("enqueue"),
            self._max_unpack_size(),
            redis_message_id,
            data,
        ]
        now = time.monotonic()
        if now - self._woken.get(queue_name, -1.0) < WAKE_AGAIN_AFTER_S:
            # A token went out for this queue a moment ago: whoever it woke is fetching now
            # and finds this message too, or fetches again within its first back-off step.
            return script(keys=[self.namespace], args=args)
        self._woken[queue_name] = now
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, 1, self.namespace, *args)
        pipe.execute_command(
            "ZADD", self.wake_key(queue_name), 0, random.randrange(WAKE_TOKENS_KEPT)
        )
        stored, woken = pipe.execute(raise_on_error=False)
        if isinstance(woken, redis.RedisError):
            # The message is stored; without the token it is found by the next poll.
            self.logger.warning("could not push a wake-up token for %s", queue_name)
        if isinstance(stored, redis.exceptions.NoScriptError):
            # Redis lost its scripts (a restart, SCRIPT FLUSH): the script object loads it.
            return script(keys=[self.namespace], args=args)
        if isinstance(stored, Exception):
            raise stored
        return stored

    def wait_for_work(self, queue_name: str, timeout_ms: int) -> None:
        """Block until a token arrives for the queue or timeout_ms pass."""
        # The timeout is in seconds (decimals allowed); 0 would mean forever.
        self.client.bzpopmin([self.wake_key(queue_name)], timeout=max(timeout_ms, 1) / 1000)


class _WakingConsumer(_RedisConsumer):
    def __next__(self):
        try:
            can_fetch = self.outstanding_message_count < self.prefetch
            if not self.message_cache and can_fetch:
                self.message_cache = self.broker.do_fetch(
                    self.queue_name, self.prefetch - self.outstanding_message_count
                )
            while self.message_cache:
                data = self.message_cache.pop(0)
                if data is None:  # Dramatiq's consumer skips these too (its issue #266)
                    continue
                self.misses = 0
                return self._take(data)

            if not can_fetch:
                # Every prefetched message is still being worked on. Look again soon (a thread
                # may finish any moment); don't take a token another consumer could use, and
                # don't back off: Dramatiq's consumer does, and a busy queue then idles threads
                # for up to the whole worker timeout.
                time.sleep(FULL_PREFETCH_RECHECK_S)
                return None
            self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
            self.broker.wait_for_work(self.queue_name, backoff_ms)
            return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def _take(self, data: bytes) -> MessageProxy:
        message = Message.decode(data)
        self.queued_message_ids.add(message.message_id)
        return MessageProxy(message)


class SkipQueues(Middleware):
    """Keeps this process's worker off some queues (WORKER_SKIP_QUEUES), so that another
    process can have them to itself: the Procfile's `assistant` process streams the replies,
    which hold a thread for as long as the model talks and are what a visitor waits for,
    while `worker` runs the event handlers, whose bursts would otherwise share threads,
    a GIL and a queue with them."""

    def __init__(self, queues: set[str]) -> None:
        self.queues = set(queues)

    def before_worker_boot(self, broker, worker) -> None:
        # Dramatiq's worker consumes the queues of its whitelist (`--queues`), or all.
        wanted = worker.consumer_whitelist or broker.get_declared_queues()
        worker.consumer_whitelist = set(wanted) - self.queues
