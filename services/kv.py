"""Small shared state: sliding-window rate limits and short-lived flags.

In-memory in embedded mode (one process), Redis in production so every web and worker
process sees the same counts and flags.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass

from flask import Flask, current_app


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after: int = 0  # whole seconds until one more message is allowed


class MemoryKV:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._flags: dict[str, float] = {}

    def hit(self, key: str, limit: int, window: float) -> RateDecision:
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and hits[0] <= now - window:
                hits.popleft()
            if len(hits) >= limit:
                return RateDecision(False, max(1, int(hits[0] + window - now + 0.999)))
            hits.append(now)
            return RateDecision(True)

    def set_flag(self, key: str, ttl: float) -> None:
        with self._lock:
            self._flags[key] = time.monotonic() + ttl

    def claim(self, key: str, ttl: float) -> bool:
        """Set the flag unless it is set; True for the one caller that set it."""
        with self._lock:
            expires = self._flags.get(key)
            now = time.monotonic()
            if expires is not None and expires >= now:
                return False
            self._flags[key] = now + ttl
            return True

    def has_flag(self, key: str) -> bool:
        with self._lock:
            expires = self._flags.get(key)
            if expires is None:
                return False
            if expires < time.monotonic():
                del self._flags[key]
                return False
            return True


# Sliding log in a sorted set: drop hits older than the window, count, add when allowed.
_HIT_SCRIPT = """
local key, now, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, tostring(tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', key, now, member)
redis.call('PEXPIRE', key, math.ceil(window * 1000))
return {1, '0'}
"""


class RedisKV:
    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self.prefix = prefix
        self._hit = self.redis.register_script(_HIT_SCRIPT)

    def hit(self, key: str, limit: int, window: float) -> RateDecision:
        allowed, wait = self._hit(
            keys=[self.prefix + "rl:" + key],
            args=[time.time(), window, limit, uuid.uuid4().hex],
        )
        if int(allowed):
            return RateDecision(True)
        return RateDecision(False, max(1, int(float(wait) + 0.999)))

    def set_flag(self, key: str, ttl: float) -> None:
        self.redis.set(self.prefix + "flag:" + key, "1", px=max(1, int(ttl * 1000)))

    def claim(self, key: str, ttl: float) -> bool:
        """Set the flag unless it is set (SET NX); True for the one caller that set it."""
        key = self.prefix + "flag:" + key
        return bool(self.redis.set(key, "1", nx=True, px=max(1, int(ttl * 1000))))

    def has_flag(self, key: str) -> bool:
        return bool(self.redis.exists(self.prefix + "flag:" + key))


def init_kv(app: Flask) -> None:
    if app.config.get("REDIS_URL"):
        kv: MemoryKV | RedisKV = RedisKV(app.config["REDIS_URL"], app.config["REDIS_PREFIX"])
    else:
        kv = MemoryKV()
    app.extensions["switchboard.kv"] = kv


def kv() -> MemoryKV | RedisKV:
    return current_app.extensions["switchboard.kv"]
