"""Small shared state: moving-window rate limits and short-lived flags.

In-memory in embedded mode (one process), Redis in production so every web and worker
process sees the same counts and flags.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from flask import Flask, current_app
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

logger = logging.getLogger("switchboard.kv")


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after: int = 0  # whole seconds until one more hit is allowed


class _Limiter:
    """Moving-window limits from the `limits` library over the given storage: the one rate
    limiter of the app (chat socket, login, API)."""

    def __init__(self, storage: Storage) -> None:
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, key: str, limit: int, window: float) -> RateDecision:
        """Count one hit against `limit` per `window` seconds for `key`, unless it is used up."""
        item = RateLimitItemPerSecond(limit, max(1, math.ceil(window)))
        try:
            if self._limiter.hit(item, key):
                return RateDecision(True)
            reset_at, _remaining = self._limiter.get_window_stats(item, key)
        except StorageError as exc:
            # Redis is down: sign-ins, the API and chats keep working (unthrottled) rather
            # than all failing until it is back.
            logger.warning("rate limit %r not checked: %s", key.split(":")[0], exc)
            return RateDecision(True)
        return RateDecision(False, max(1, math.ceil(reset_at - time.time())))

    def hit_all(self, checks: list[tuple[str, int, float]]) -> tuple[int | None, RateDecision]:
        """hit() each (key, limit, window) in order, stopping at the first that is used up:
        (its index, its decision), or (None, allowed). The ones before it were counted."""
        for index, (key, limit, window) in enumerate(checks):
            decision = self.hit(key, limit, window)
            if not decision.allowed:
                return index, decision
        return None, RateDecision(True)


class MemoryKV(_Limiter):
    def __init__(self) -> None:
        super().__init__(MemoryStorage())
        self._lock = threading.RLock()  # claim_and_mark holds it around claim
        self._flags: dict[str, float] = {}

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

    def has_flags(self, keys: list[str]) -> list[bool]:
        return [self.has_flag(key) for key in keys]

    def set_flags(self, keys: list[str], ttl: float) -> None:
        with self._lock:
            for key in keys:
                self.set_flag(key, ttl)

    def claim_and_mark(self, key: str, ttl: float, mark: str, mark_ttl: float) -> bool | None:
        """claim(key, ttl); when that succeeds, also set the flag `mark` and say whether it
        was set before (True / False). None when the claim failed (`mark` untouched)."""
        with self._lock:
            if not self.claim(key, ttl):
                return None
            was = self.has_flag(mark)
            self.set_flag(mark, mark_ttl)
            return was


# 0: not claimed; 1: claimed, the mark was not set; 2: claimed, the mark was set already.
_CLAIM_AND_MARK = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
if redis.call('SET', KEYS[2], '1', 'PX', ARGV[2], 'GET') then
  return 2
end
return 1
"""


# _Limiter.hit_all for Redis, in one round trip: the `limits` library's moving window (a
# list of hit times, newest first, cut to the limit; its acquire_moving_window script) for
# each key in turn, until one is used up. KEYS: the lists; ARGV: the time, then the limit
# and the window (s) of each. Returns {index of the used-up key (0: none), seconds until its
# oldest hit leaves the window}.
_HIT_ALL = """
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local oldest = redis.call('LINDEX', KEYS[i], limit - 1)
  if oldest and tonumber(oldest) >= now - window then
    return {i, tostring(tonumber(oldest) + window - now)}
  end
  redis.call('LPUSH', KEYS[i], ARGV[1])
  redis.call('LTRIM', KEYS[i], 0, limit - 1)
  redis.call('EXPIRE', KEYS[i], window)
end
return {0, '0'}
"""


class RedisKV(_Limiter):
    def __init__(self, url: str, prefix: str) -> None:
        import redis

        options = {"socket_timeout": 5, "socket_connect_timeout": 3}
        storage = RedisStorage(url, key_prefix=prefix + "rl", wrap_exceptions=True, **options)
        super().__init__(storage)
        self._storage = storage
        self.redis = redis.Redis.from_url(url, **options)
        self.prefix = prefix
        self._claim_and_mark = None
        self._hit_all = self.redis.register_script(_HIT_ALL)

    def hit_all(self, checks: list[tuple[str, int, float]]) -> tuple[int | None, RateDecision]:
        """As _Limiter.hit_all, in one round trip instead of one per limit (a visitor's
        message passes four, on the way to its reply's first token); the same keys and
        lists as hit(), so either reads what the other counted."""
        if not checks:
            return None, RateDecision(True)
        keys: list[str] = []
        args: list[float | int] = [time.time()]
        for key, limit, window in checks:
            item = RateLimitItemPerSecond(limit, max(1, math.ceil(window)))
            keys.append(self._storage.prefixed_key(item.key_for(key)))
            args += [item.amount, item.get_expiry()]
        try:
            index, wait = self._hit_all(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - as hit(): Redis down, unthrottled
            logger.warning("rate limits %r not checked: %s", checks[0][0].split(":")[0], exc)
            return None, RateDecision(True)
        if not index:
            return None, RateDecision(True)
        return int(index) - 1, RateDecision(False, max(1, math.ceil(float(wait))))

    def set_flag(self, key: str, ttl: float) -> None:
        self.redis.set(self.prefix + "flag:" + key, "1", px=max(1, int(ttl * 1000)))

    def claim(self, key: str, ttl: float) -> bool:
        """Set the flag unless it is set (SET NX); True for the one caller that set it."""
        key = self.prefix + "flag:" + key
        return bool(self.redis.set(key, "1", nx=True, px=max(1, int(ttl * 1000))))

    def has_flag(self, key: str) -> bool:
        return bool(self.redis.exists(self.prefix + "flag:" + key))

    def claim_and_mark(self, key: str, ttl: float, mark: str, mark_ttl: float) -> bool | None:
        """As MemoryKV.claim_and_mark, in one round trip: a reply's start waits for it."""
        if self._claim_and_mark is None:
            self._claim_and_mark = self.redis.register_script(_CLAIM_AND_MARK)
        outcome = self._claim_and_mark(
            keys=[self.prefix + "flag:" + key, self.prefix + "flag:" + mark],
            args=[max(1, int(ttl * 1000)), max(1, int(mark_ttl * 1000))],
        )
        return None if outcome == 0 else outcome == 2

    def set_flags(self, keys: list[str], ttl: float) -> None:
        """set_flag for each key, in one round trip."""
        if not keys:
            return
        ms = max(1, int(ttl * 1000))
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(self.prefix + "flag:" + key, "1", px=ms)
            pipe.execute()

    def has_flags(self, keys: list[str]) -> list[bool]:
        """Which of the flags are set, in one round trip."""
        if not keys:
            return []
        values = self.redis.mget([self.prefix + "flag:" + key for key in keys])
        return [value is not None for value in values]


def init_kv(app: Flask) -> None:
    if app.config.get("REDIS_URL"):
        kv: MemoryKV | RedisKV = RedisKV(app.config["REDIS_URL"], app.config["REDIS_PREFIX"])
    else:
        kv = MemoryKV()
    app.extensions["switchboard.kv"] = kv


def kv() -> MemoryKV | RedisKV:
    return current_app.extensions["switchboard.kv"]
