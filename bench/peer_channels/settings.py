"""Django settings of the Channels peer: nothing but the channel layer.

It runs in its own virtualenv (bench/peer_channels/.venv) under daphne, started by
bench/bench_fanout.py, which passes the Redis URL and a key prefix of its run's namespace.
"""

import os

SECRET_KEY = os.environ.get("PEER_SECRET_KEY", "bench-peer-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
ROOT_URLCONF = None
ASGI_APPLICATION = "asgi.application"
USE_TZ = True

CHANNEL_LAYERS = {
    "default": {
        # Redis pub/sub: a group message goes to every subscribed process once, and each
        # process hands it to its consumers. Pub/sub channels ignore the database number,
        # so the prefix is what keeps the run apart from others on the same Redis.
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")],
            "prefix": os.environ.get("PEER_PREFIX", "sbbench:peer:"),
        },
    }
}
