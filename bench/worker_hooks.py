"""Imported by every benchmark worker process (bench.common.dramatiq_workers adds it to
EXTRA_ACTOR_MODULES): each booted worker process counts itself in Redis, so a benchmark
starts measuring only once all its workers consume.

tasks/broker.py imports EXTRA_ACTOR_MODULES after `dramatiq.set_broker`, so get_broker() here
is the worker's RedisBroker.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.middleware import Middleware


class ReportReady(Middleware):
    def after_worker_boot(self, broker, worker):
        import redis

        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            client.incr(os.environ["REDIS_PREFIX"] + "bench:workers_ready")
        finally:
            client.close()


if os.environ.get("SWITCHBOARD_BENCH_WORKER") == "1":
    dramatiq.get_broker().add_middleware(ReportReady())
