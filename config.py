"""Configuration read from the environment (and a `.env` file when present).

Every knob here is documented in the README's Configuration table with its default.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent
INSTANCE_DIR = Path(os.environ.get("SWITCHBOARD_INSTANCE", BASE_DIR / "instance"))

load_dotenv(BASE_DIR / ".env")


class ConfigError(SystemExit):
    """Start-up refused because the configuration is unsafe or incomplete.

    A SystemExit, so `flask`, gunicorn and dramatiq stop with this one line on stderr and
    exit status 1 instead of a traceback that buries the reason.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"Switchboard configuration error: {message}")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated setting, blanks dropped."""
    return tuple(part.strip() for part in (_env(name) or "").split(",") if part.strip())


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _networks(name: str) -> str:
    import ipaddress

    raw = (_env(name) or "").strip()
    for part in raw.replace(",", " ").split():
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{name} must be comma-separated CIDRs, got {part!r}") from exc
    return raw


def _bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _rate_limit(name: str, default: str) -> tuple[int, int]:
    """A rate limit in the `limits` notation ("5/5minutes", "600 per minute") as
    (hits, window in seconds)."""
    import limits

    raw = _env(name, default)
    try:
        item = limits.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must look like 5/5minutes or 600/minute, got {raw!r}") from exc
    return item.amount, item.get_expiry()


def _embedded_secret_key() -> str:
    """Generate a secret key once for embedded mode and keep it under instance/."""
    INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
    path = INSTANCE_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_hex(32)
    path.write_text(key)
    path.chmod(0o600)
    return key


class Config:
    """Runtime configuration. Instantiated at app creation so the environment is read then."""

    def __init__(self) -> None:
        self.REDIS_URL = _env("REDIS_URL")
        self.DATABASE_URL = _env("DATABASE_URL")
        self.EMBEDDED = self.REDIS_URL is None
        self.DEBUG = _bool("FLASK_DEBUG", False)

        if self.DATABASE_URL:
            url = self.DATABASE_URL
            # Heroku-style URLs and bare postgresql:// both mean psycopg 3 here.
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://") :]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            self.SQLALCHEMY_DATABASE_URI = url
        else:
            INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
            self.SQLALCHEMY_DATABASE_URI = f"sqlite:///{INSTANCE_DIR / 'switchboard.db'}"

        secret = _env("SECRET_KEY")
        if secret is None:
            if not self.EMBEDDED:
                raise ConfigError(
                    "SECRET_KEY is not set. Production mode (REDIS_URL is set) refuses to start "
                    "without one: export SECRET_KEY=$(python -c 'import secrets; "
                    "print(secrets.token_hex(32))')"
                )
            secret = _embedded_secret_key()
        self.SECRET_KEY = secret

        # Number of reverse proxies in front of the app whose X-Forwarded-* to trust.
        self.PROXY_FIX_HOPS = _int("PROXY_FIX_HOPS", 0)
        # Connections per process. Size it for the threads that use the database at once
        # (web request threads; a worker's threads); WebSockets hold none while they wait.
        self.SQLALCHEMY_ENGINE_OPTIONS = {
            # Pinged before use only after DATABASE_PING_IDLE_SECONDS idle (app.py).
            "pool_pre_ping": False,
            "pool_size": _int("DATABASE_POOL_SIZE", 10),
            "max_overflow": _int("DATABASE_MAX_OVERFLOW", 20),
            "pool_timeout": _float("DATABASE_POOL_TIMEOUT", 30.0),
        }
        self.DATABASE_PING_IDLE_SECONDS = _float("DATABASE_PING_IDLE_SECONDS", 2.0)
        self.SESSION_COOKIE_HTTPONLY = True
        self.SESSION_COOKIE_SAMESITE = "Lax"
        # Secure cookies unless debugging; `make run` (plain http on 127.0.0.1) sets it to 0.
        self.SESSION_COOKIE_SECURE = _bool("SESSION_COOKIE_SECURE", not self.DEBUG)
        self.REMEMBER_COOKIE_SECURE = self.SESSION_COOKIE_SECURE
        # Strict-Transport-Security max-age (seconds) sent while cookies are Secure; 0: none.
        self.HSTS_MAX_AGE = _int("HSTS_MAX_AGE", 31_536_000)
        self.REMEMBER_COOKIE_HTTPONLY = True
        self.REMEMBER_COOKIE_SAMESITE = "Lax"
        # How long "Keep me signed in" lasts; the server refuses older logins (session and
        # remember cookie alike) even when a copied cookie carries no expiry date.
        self.REMEMBER_COOKIE_DURATION = timedelta(days=_float("REMEMBER_COOKIE_DAYS", 14))
        # Sign-in attempts (right or wrong) per client address and per email address, as
        # Chatwoot's rack-attack rules count them.
        self.LOGIN_LIMIT_PER_IP = _rate_limit("LOGIN_LIMIT_PER_IP", "5/5minutes")
        self.LOGIN_LIMIT_PER_EMAIL = _rate_limit("LOGIN_LIMIT_PER_EMAIL", "10/15minutes")
        # JSON API requests per user (API token or session) and per client address.
        self.API_RATE_LIMIT_PER_TOKEN = _rate_limit("API_RATE_LIMIT_PER_TOKEN", "600/minute")
        self.API_RATE_LIMIT_PER_IP = _rate_limit("API_RATE_LIMIT_PER_IP", "1200/minute")
        self.WTF_CSRF_TIME_LIMIT = None  # token lives as long as the session
        self.WTF_CSRF_HEADERS = ["X-CSRFToken"]

        # The assistant (used by the chats issue); empty means clearly labelled fallbacks.
        self.OPENAI_API_KEY = _env("OPENAI_API_KEY")
        self.OPENAI_BASE_URL = _env("OPENAI_BASE_URL")
        self.OPENAI_MODEL = _env("OPENAI_MODEL", "gpt-4o-mini")

        # Keys in Redis: Dramatiq queues live under DRAMATIQ_NAMESPACE, everything else
        # (live streams, scheduler locks, rate limits) under REDIS_PREFIX.
        self.DRAMATIQ_NAMESPACE = _env("DRAMATIQ_NAMESPACE", "switchboard")
        self.REDIS_PREFIX = _env("REDIS_PREFIX", "sb:")
        self.DRAMATIQ_PROMETHEUS = _bool("DRAMATIQ_PROMETHEUS", False)
        # Base URL used to render links in fragments built by workers.
        self.PUBLIC_URL = _env("PUBLIC_URL", "http://127.0.0.1:5000/")

        # The spine.
        self.EVENTS_RELAY_INTERVAL = _float("EVENTS_RELAY_INTERVAL", 5.0)
        self.EVENTS_REDELIVER_AFTER = _float("EVENTS_REDELIVER_AFTER", 120.0)
        self.EVENTS_RELAY_BATCH = _int("EVENTS_RELAY_BATCH", 500)
        self.EVENTS_BATCH = _int("EVENTS_BATCH", 200)
        # One scheduler per deployment enqueues the periodic jobs: the worker process holding
        # this lease in Redis; another takes over within this long after it dies.
        self.SCHEDULER_LEASE_SECONDS = _float("SCHEDULER_LEASE_SECONDS", 10.0)
        self.WORKER_THREADS = _int("WORKER_THREADS", 4)
        # Production `dramatiq` processes: queues this process leaves to another (Procfile).
        self.WORKER_SKIP_QUEUES = _list("WORKER_SKIP_QUEUES")
        # More modules whose import registers handlers/tasks (comma separated), e.g. plugins.
        self.EXTRA_ACTOR_MODULES = _list("EXTRA_ACTOR_MODULES")
        # Embedded mode runs Dramatiq worker threads inside the web process; `flask` CLI
        # commands never start them (their events wait for the web process's relay).
        self.START_EMBEDDED_WORKER = _bool("START_EMBEDDED_WORKER", True)

        # Live updates.
        self.LIVE_STREAM_MAXLEN = _int("LIVE_STREAM_MAXLEN", 1000)
        # Frames one socket may have waiting; beyond that it is behind and catches up from the
        # stream (chat) or gets a fresh snapshot (pages).
        self.LIVE_SUBSCRIPTION_BUFFER = _int("LIVE_SUBSCRIPTION_BUFFER", 2000)
        self.LIVE_COALESCE_MS = _int("LIVE_COALESCE_MS", 50)
        # How soon a web process reads the live bus again after a read that brought many
        # frames (events.live.Hub.BUSY_READ): under load, fewer and larger reads.
        self.LIVE_READ_INTERVAL_MS = _int("LIVE_READ_INTERVAL_MS", 10)
        # Bytes a chat socket's client may leave unread before it is cut off (its widget
        # reconnects and resumes its replies from where it was).
        self.CHAT_SOCKET_BUFFER_BYTES = _int("CHAT_SOCKET_BUFFER_BYTES", 2 * 1024 * 1024)
        self.LIVE_PING_SECONDS = _int("LIVE_PING_SECONDS", 25)
        self.LIVE_TOKEN_MAX_AGE = _int("LIVE_TOKEN_MAX_AGE", 12 * 3600)
        # Frames larger than this close the socket (1009) instead of being buffered.
        self.SOCK_SERVER_OPTIONS = {
            "ping_interval": self.LIVE_PING_SECONDS,
            "max_message_size": _int("WS_MAX_MESSAGE_BYTES", 64 * 1024),
        }
        # Extra origins allowed to open the console's /ws/live (comma separated); the
        # console's own origin is always allowed.
        self.LIVE_ALLOWED_ORIGINS = list(_list("LIVE_ALLOWED_ORIGINS"))

        # Chats: the widget socket, replies and archiving.
        self.CHAT_RATE_LIMIT_PER_MINUTE = _int("CHAT_RATE_LIMIT_PER_MINUTE", 10)
        # A new socket is a new visitor, so the widget's model costs are also capped per client
        # address (per widget key) and per widget key as a whole.
        self.CHAT_NEW_CHATS_PER_IP_PER_HOUR = _int("CHAT_NEW_CHATS_PER_IP_PER_HOUR", 10)
        self.CHAT_MESSAGES_PER_IP_PER_MINUTE = _int("CHAT_MESSAGES_PER_IP_PER_MINUTE", 30)
        self.CHAT_MESSAGES_PER_WIDGET_PER_MINUTE = _int("CHAT_MESSAGES_PER_WIDGET_PER_MINUTE", 300)
        self.CHAT_MAX_MESSAGE_LENGTH = _int("CHAT_MAX_MESSAGE_LENGTH", 2000)
        self.CHAT_HISTORY_MESSAGES = _int("CHAT_HISTORY_MESSAGES", 50)
        # A streamed reply's time limits (seconds): its first text (retries and a 429's
        # Retry-After included), the longest silence once text flows, and the whole reply
        # (kept under the reply task's 120 s time limit). A reply cut after text has come
        # is saved and shown labelled as cut.
        self.CHAT_FIRST_TOKEN_TIMEOUT = _float("CHAT_FIRST_TOKEN_TIMEOUT", 30.0)
        self.CHAT_STREAM_IDLE_TIMEOUT = _float("CHAT_STREAM_IDLE_TIMEOUT", 20.0)
        self.CHAT_RESPONSE_MAX_SECONDS = _float("CHAT_RESPONSE_MAX_SECONDS", 100.0)
        # A reply's tokens that come within this many ms of each other go out as one live
        # frame (its first text goes at once); 0 sends every token as a frame of its own.
        self.CHAT_DELTA_COALESCE_MS = _float("CHAT_DELTA_COALESCE_MS", 30.0)
        # The events of a visitor message that starts a reply (sentiment, escalation, the
        # operators' live view, metrics, audit) go to their handlers this many ms after its
        # commit, once the reply has started, instead of competing with its start for the
        # cores. 0 sends them at once (the default in embedded mode, where one process does
        # everything and the tests wait for the queues). Keep it well under a second: the
        # relay sends what has been pending for a second itself.
        self.CHAT_EVENTS_DELAY_MS = _float("CHAT_EVENTS_DELAY_MS", 0.0 if self.EMBEDDED else 20.0)
        # A reply being written holds a lease (seconds) its process renews; a reply whose
        # lease ran out (the process died) is started again by a sweep run this often
        # (seconds; 0 turns it off), for visitor messages up to CHAT_REPLY_RESUME_WINDOW
        # seconds old. A reply that cannot be saved (the database away) is retried for up
        # to CHAT_REPLY_SAVE_RETRY_SECONDS.
        self.CHAT_REPLY_LEASE_SECONDS = _float("CHAT_REPLY_LEASE_SECONDS", 15.0)
        self.CHAT_REPLY_SWEEP_INTERVAL = _float("CHAT_REPLY_SWEEP_INTERVAL", 5.0)
        self.CHAT_REPLY_RESUME_WINDOW = _float("CHAT_REPLY_RESUME_WINDOW", 600.0)
        self.CHAT_REPLY_SAVE_RETRY_SECONDS = _float("CHAT_REPLY_SAVE_RETRY_SECONDS", 60.0)
        self.CHAT_SESSION_EXPIRY_HOURS = _float("CHAT_SESSION_EXPIRY_HOURS", 24.0)
        self.CHAT_INACTIVITY_HOURS = _float("CHAT_INACTIVITY_HOURS", 24.0)
        self.CHAT_ARCHIVE_INTERVAL = _float("CHAT_ARCHIVE_INTERVAL", 300.0)
        # lexicon (default, offline: VADER for English, our lexicons for Spanish and
        # Portuguese), vader (VADER alone), or llm (the configured model, batched; the
        # lexicon answers when it fails).
        self.SENTIMENT_BACKEND = _env("SENTIMENT_BACKEND", "lexicon")
        self.SENTIMENT_THRESHOLD = _float("SENTIMENT_THRESHOLD", 0.05)
        # The languages a visitor message is told apart among (ISO 639-1, comma-separated).
        self.SENTIMENT_LANGUAGES = _env("SENTIMENT_LANGUAGES", "en,es,pt")
        self.SENTIMENT_LLM_MODEL = _env("SENTIMENT_LLM_MODEL", "")  # empty: OPENAI_MODEL
        self.SENTIMENT_LLM_TIMEOUT = _float("SENTIMENT_LLM_TIMEOUT", 5.0)
        self.SENTIMENT_LLM_BATCH = _int("SENTIMENT_LLM_BATCH", 20)
        # A complaint table learned from this installation's messages (`flask chats
        # sentiment-train --out FILE`); empty: the table shipped in services/lexicons.
        self.SENTIMENT_TABLE = _env("SENTIMENT_TABLE", "")

        # Devices: polling, offline detection, alerts.
        self.DEVICES_POLL_INTERVAL = _float("DEVICES_POLL_INTERVAL", 10.0)
        self.DEVICES_POLL_TIMEOUT = _float("DEVICES_POLL_TIMEOUT", 3.0)
        self.DEVICES_OFFLINE_AFTER_MISSES = _int("DEVICES_OFFLINE_AFTER_MISSES", 3)
        self.DEVICES_AUTO_PROVISION = _bool("DEVICES_AUTO_PROVISION", False)
        self.DEVICES_ALERT_REMINDER_MINUTES = _float("DEVICES_ALERT_REMINDER_MINUTES", 30.0)
        # A device answering again after an alerted outage is announced back only once it
        # has answered this long; going down again meanwhile is the same outage (a flap).
        self.DEVICES_RECOVERY_CONFIRM_SECONDS = _float("DEVICES_RECOVERY_CONFIRM_SECONDS", 60.0)
        self.DEVICES_LOW_BATTERY_BARS = _int("DEVICES_LOW_BATTERY_BARS", 1)
        # Reports a poll applies per commit (its events are dispatched at each commit).
        self.DEVICES_POLL_COMMIT_EVERY = _int("DEVICES_POLL_COMMIT_EVERY", 200)
        # The Shure client (services/manufacturers/shure.py): meter sampling rate, silence
        # before a connection is presumed dead, connect timeout, reconnect back-off bounds,
        # and how long an endpoint nobody polls keeps its connection.
        self.DEVICES_SHURE_METER_RATE_MS = _int("DEVICES_SHURE_METER_RATE_MS", 1000)
        self.DEVICES_SHURE_SILENCE_TIMEOUT = _float("DEVICES_SHURE_SILENCE_TIMEOUT", 5.0)
        self.DEVICES_SHURE_CONNECT_TIMEOUT = _float("DEVICES_SHURE_CONNECT_TIMEOUT", 2.0)
        self.DEVICES_SHURE_BACKOFF_INITIAL = _float("DEVICES_SHURE_BACKOFF_INITIAL", 0.5)
        self.DEVICES_SHURE_BACKOFF_MAX = _float("DEVICES_SHURE_BACKOFF_MAX", 30.0)
        self.DEVICES_SHURE_IDLE_TIMEOUT = _float("DEVICES_SHURE_IDLE_TIMEOUT", 600.0)
        # One connection per receiver for the deployment (services/meters.py): the owner's
        # lease, the live meter frame interval, how long pushed changes settle before they
        # are applied, and how many days of per-minute meter history are kept.
        self.DEVICES_SHURE_LEASE_SECONDS = _float("DEVICES_SHURE_LEASE_SECONDS", 10.0)
        self.DEVICES_METER_FRAME_MS = _int("DEVICES_METER_FRAME_MS", 50)
        self.DEVICES_PUSH_DEBOUNCE_MS = _int("DEVICES_PUSH_DEBOUNCE_MS", 150)
        self.DEVICES_METER_HISTORY_DAYS = _float("DEVICES_METER_HISTORY_DAYS", 14.0)
        # `flask serve` starts this many simulated Shure receivers for the demo tenant.
        self.DEVICES_SIMULATOR_RECEIVERS = _int("DEVICES_SIMULATOR_RECEIVERS", 0)
        # `flask serve` starts this many simulated receivers for the demo tenant (0: none).
        # Networks receivers may be reached in (comma-separated CIDRs); empty: the private
        # ranges, plus loopback while DEVICES_SIMULATOR_RECEIVERS > 0 (services/netpolicy.py).
        self.DEVICES_ALLOWED_NETWORKS = _networks("DEVICES_ALLOWED_NETWORKS")

        # Projects: generation limits and where export artifacts are kept.
        self.PROJECT_MAX_FILES = _int("PROJECT_MAX_FILES", 200)
        self.PROJECT_MAX_FILE_BYTES = _int("PROJECT_MAX_FILE_BYTES", 256 * 1024)
        self.PROJECT_MAX_TOTAL_BYTES = _int("PROJECT_MAX_TOTAL_BYTES", 5 * 1024 * 1024)
        # Seconds a whole generation may take, model retries included.
        self.PROJECT_GENERATION_TIMEOUT = _float("PROJECT_GENERATION_TIMEOUT", 120.0)
        # A generation `generating` / an export `running` this long is ended by the sweeper.
        self.PROJECT_STALE_AFTER_SECONDS = _float(
            "PROJECT_STALE_AFTER_SECONDS", 2 * self.PROJECT_GENERATION_TIMEOUT
        )
        self.PROJECT_SWEEP_INTERVAL = _float("PROJECT_SWEEP_INTERVAL", 60.0)
        self.EXPORTS_DIR = _env("EXPORTS_DIR")  # default: instance/exports

        # Outgoing webhooks. Tries per event (the first POST and its retries) before giving up.
        self.WEBHOOK_MAX_ATTEMPTS = max(1, _int("WEBHOOK_MAX_ATTEMPTS", 6))
        # Seconds to connect, and again to wait for the response, per POST.
        self.WEBHOOK_TIMEOUT_SECONDS = _float("WEBHOOK_TIMEOUT_SECONDS", 10.0)
        # Off: endpoints resolving to loopback, private, link-local or reserved addresses are
        # refused (a tenant admin must not reach the internal network through the workers).
        self.WEBHOOK_ALLOW_PRIVATE_NETWORKS = _bool("WEBHOOK_ALLOW_PRIVATE_NETWORKS", False)
        # Retry n waits about WEBHOOK_RETRY_MIN_MS * 2**(n-1), capped at WEBHOOK_RETRY_MAX_MS.
        self.WEBHOOK_RETRY_MIN_MS = _int("WEBHOOK_RETRY_MIN_MS", 30_000)
        self.WEBHOOK_RETRY_MAX_MS = _int("WEBHOOK_RETRY_MAX_MS", 3_600_000)
        # An endpoint is disabled (and its tenant's admins notified) after this many events
        # in a row were given up on; 0 never disables.
        self.WEBHOOK_DISABLE_AFTER_FAILURES = _int("WEBHOOK_DISABLE_AFTER_FAILURES", 5)
        # Seconds between runs of the webhook relay, which sends due deliveries (retries, and
        # those whose queue message was lost) and hands back claims whose worker died.
        self.WEBHOOK_RELAY_INTERVAL = _float("WEBHOOK_RELAY_INTERVAL", 5.0)
        # A due delivery whose queue message has not run after this long is sent again.
        self.WEBHOOK_REQUEUE_AFTER_SECONDS = _float("WEBHOOK_REQUEUE_AFTER_SECONDS", 30.0)
        # A delivery claimed this long ago with no outcome recorded (a killed worker, the
        # database gone after the POST) is sent again, with the same webhook-id. Above the
        # delivery task's 120 s time limit, so a slow attempt is not sent twice at once.
        self.WEBHOOK_SEND_LEASE_SECONDS = _float("WEBHOOK_SEND_LEASE_SECONDS", 180.0)

        # Notifications: one per (type, subject, recipient) within this many seconds.
        self.NOTIFY_DEDUPE_SECONDS = _int("NOTIFY_DEDUPE_SECONDS", 3600)
        # smtp://user:pass@host:port, smtps://… or smtp://…?starttls=1; unset sends no email.
        self.SMTP_URL = _env("SMTP_URL")
        self.MAIL_FROM = _env("MAIL_FROM", "switchboard@localhost")

        # /metrics: a bearer token, or a client address inside one of these networks.
        # After counted events, how long a worker waits before re-rendering the open Metrics
        # pages of that tenant: a burst is one re-render per tenant, not one per event.
        self.METRICS_LIVE_DELAY_MS = _int("METRICS_LIVE_DELAY_MS", 500)
        self.METRICS_TOKEN = _env("METRICS_TOKEN")
        self.METRICS_ALLOWED_NETWORKS = _env("METRICS_ALLOWED_NETWORKS", "127.0.0.1/32,::1/128")

        self.FEED_PAGE_SIZE = _int("FEED_PAGE_SIZE", 50)
        self.LIST_PAGE_SIZE = _int("LIST_PAGE_SIZE", 25)

        self.DEMO_EMAIL = _env("DEMO_EMAIL", "admin@demo.example")
        self.DEMO_PASSWORD = _env("DEMO_PASSWORD", "switchboard-demo")

        self.TESTING = False

    @property
    def DEVICES_ALERT_CHECK_SECONDS(self) -> float:  # noqa: N802 - a setting's name
        """How often the reminder / recovery job runs: a quarter of the shorter of the two
        intervals it serves, between 1 and 15 s, so a reminder set below a minute is kept."""
        reminder = self.DEVICES_ALERT_REMINDER_MINUTES * 60.0
        confirm = self.DEVICES_RECOVERY_CONFIRM_SECONDS
        shortest = min(reminder, confirm) if confirm > 0 else reminder
        return min(15.0, max(1.0, shortest / 4.0))


class TestConfig(Config):
    """Configuration for the test-suite: in-memory-free temp SQLite unless overridden."""

    def __init__(self, **overrides: object) -> None:
        os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
        super().__init__()
        self.TESTING = True
        self.SESSION_COOKIE_SECURE = False
        self.REMEMBER_COOKIE_SECURE = False
        # The suite signs many users in and calls the API from 127.0.0.1; the tests of the
        # limits themselves set them explicitly.
        self.LOGIN_LIMIT_PER_IP = self.LOGIN_LIMIT_PER_EMAIL = (10_000, 300)
        self.API_RATE_LIMIT_PER_TOKEN = self.API_RATE_LIMIT_PER_IP = (100_000, 60)
        self.START_EMBEDDED_WORKER = False
        self.EVENTS_RELAY_INTERVAL = 0.2
        self.WEBHOOK_RELAY_INTERVAL = 0.2
        self.LIVE_COALESCE_MS = 20
        # The tests' webhook receivers and simulated Shure receivers listen on 127.0.0.1.
        self.WEBHOOK_ALLOW_PRIVATE_NETWORKS = True
        self.DEVICES_ALLOWED_NETWORKS = (
            "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,127.0.0.0/8,::1/128"
        )
        for key, value in overrides.items():
            setattr(self, key, value)
