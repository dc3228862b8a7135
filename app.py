"""Application factory. There is no module-level app: wsgi.py calls create_app()."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, jsonify, render_template, request, session
from flask_login import current_user
from flask_wtf.csrf import CSRFError

from config import BASE_DIR, INSTANCE_DIR, Config
from events.fanout import Broadcaster, SocketPump
from events.live import Hub, MemoryBus, RedisBus
from extensions import csrf, db, login_manager, migrate, sock

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'"
)


# Topics every logged-in page subscribes to (see services/live.py topic_for).
BASE_LIVE_TOPICS: list[str] = ["user:bell"]


@dataclass
class LiveState:
    bus: Any
    hub: Hub
    pages: Broadcaster  # writes the pages' (/ws/live) frames
    chats: SocketPump  # moves the chat sockets' (/ws/chat) frames to them


def settle_heap(app: Flask | None = None) -> None:
    """Call once a server or worker process has built its app: everything start-up made
    (modules, the app, SQLAlchemy's mappers, …, some 190,000 objects) moves into the garbage
    collector's permanent generation, so full collections no longer walk it. Each full
    collection otherwise took ~105 ms, mid-request: the dashboard's p99 was 120-130 ms against
    a p50 of 20-25 ms, and 39-40 ms with this (see bench/RESULTS.md).

    With `app`, its templates are compiled first (~0.3 s of CPU for all of them): otherwise
    each process compiles a template the first time it renders it, and the first device
    events a worker handled paid ~0.3 s for the card, feed and activity fragments."""
    if app is not None:
        for name in app.jinja_env.list_templates():
            app.jinja_env.get_template(name)
    gc.collect()
    gc.freeze()


def create_app(config: object | None = None) -> Flask:
    app = Flask(
        __name__,
        instance_path=str(INSTANCE_DIR),
        template_folder=str(BASE_DIR / "templates"),
        static_folder=str(BASE_DIR / "static"),
    )
    app.config.from_object(config if config is not None else Config())
    app.config["EMBEDDED"] = not app.config.get("REDIS_URL")
    if not app.config.get("SECRET_KEY"):
        from config import ConfigError

        raise ConfigError("SECRET_KEY is required")
    logging.basicConfig(level=app.config.get("LOG_LEVEL", "INFO"))
    hops = app.config.get("PROXY_FIX_HOPS", 0)
    if hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)

    import models  # noqa: F401 - register every table with the metadata

    db.init_app(app)

    @app.teardown_appcontext
    def release_session(_exc) -> None:
        # Runs before Flask-SQLAlchemy's own teardown (teardowns run in reverse order). If the
        # database dropped the connection under us, closing the session raises; the response
        # has already been made, so forget the session instead of turning it into a 500.
        try:
            db.session.remove()
        except Exception as exc:  # noqa: BLE001
            logging.getLogger("switchboard").warning(
                "session closed with a dead connection: %s", type(exc).__name__
            )
            db.session.registry.clear()

    _sqlite_pragmas()
    _ping_idle_connections(app)
    migrate.init_app(
        app, db, directory=str(BASE_DIR / "migrations"), render_as_batch=True, compare_type=True
    )
    sock.init_app(app)
    csrf.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "accounts.login"
    login_manager.login_message_category = "info"

    from events import outbox

    outbox.install()
    _init_live(app)

    from tasks.broker import init_broker

    init_broker(app)
    _register_blueprints(app)
    _register_cli(app)
    _register_hooks(app)
    return app


def _sqlite_pragmas() -> None:
    """SQLite enforces foreign keys (ON DELETE CASCADE) only when asked, per connection;
    WAL lets the embedded worker threads write while pages read."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_sqlite_pragmas, "installed", False):
        return

    @event.listens_for(Engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        import sqlite3

        if isinstance(dbapi_connection, sqlite3.Connection):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    _sqlite_pragmas.installed = True


def _ping_idle_connections(app: Flask) -> None:
    """Ping a pooled connection before use only when it has sat idle for
    DATABASE_PING_IDLE_SECONDS (SQLAlchemy's pool_pre_ping pings at every checkout: a round
    trip on the way to every page, handler batch and chat reply, for a connection used a
    moment ago). A failed ping replaces the connection and marks every older one of the pool
    for replacement, as pool_pre_ping does, so the app recovers from a database restart by
    itself; only a use within that many seconds of the connection's last one goes unpinged,
    and fails like any statement that meets a database gone away (the error handlers answer
    503, a task is retried)."""
    from sqlalchemy import event
    from sqlalchemy.exc import InvalidatePoolError

    idle = float(app.config.get("DATABASE_PING_IDLE_SECONDS", 2.0))
    with app.app_context():
        engines = [e for e in db.engines.values() if e.dialect.name != "sqlite"]
    for engine in engines:
        dialect = engine.dialect

        def checked_in(dbapi_connection, record) -> None:
            if dbapi_connection is not None:
                record.info["idle_since"] = (id(dbapi_connection), time.monotonic())

        def checked_out(dbapi_connection, record, proxy, dialect=dialect) -> None:
            stamp = record.info.pop("idle_since", None)
            if stamp is None or stamp[0] != id(dbapi_connection):
                return  # a new connection: just made
            if time.monotonic() - stamp[1] < idle:
                return
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:  # noqa: BLE001 - any failure: the connection is unusable
                raise InvalidatePoolError(f"ping failed: {type(exc).__name__}") from exc

        event.listen(engine, "checkin", checked_in)
        event.listen(engine, "checkout", checked_out)


def _init_live(app: Flask) -> None:
    maxlen = app.config["LIVE_STREAM_MAXLEN"]
    if app.config.get("REDIS_URL"):
        bus: Any = RedisBus(
            app.config["REDIS_URL"], prefix=app.config["REDIS_PREFIX"] + "live:", maxlen=maxlen
        )
    else:
        bus = MemoryBus(maxlen=maxlen)
    hub = Hub(
        bus,
        buffer=app.config["LIVE_SUBSCRIPTION_BUFFER"],
        read_interval=app.config["LIVE_READ_INTERVAL_MS"] / 1000,
    )
    app.extensions["switchboard.live"] = LiveState(
        bus=bus, hub=hub, pages=Broadcaster(hub, app.config), chats=SocketPump()
    )
    from services.kv import init_kv

    init_kv(app)


def _register_blueprints(app: Flask) -> None:
    from blueprints import DatabaseIdConverter

    # Every `<int:…>` in every blueprint is a database id: bounded here, once, so an id past
    # the column's range is a 404 and never reaches the database. Rules bind their converter
    # when added, so this comes before any blueprint.
    app.url_map.converters["int"] = DatabaseIdConverter
    from blueprints.accounts import bp as accounts_bp
    from blueprints.api import bp as api_bp
    from blueprints.audit import bp as audit_bp
    from blueprints.chats import bp as chats_bp
    from blueprints.dashboard import bp as dashboard_bp
    from blueprints.devices import bp as devices_bp
    from blueprints.live import register_live_routes
    from blueprints.metrics import bp as metrics_bp
    from blueprints.notifications import bp as notifications_bp
    from blueprints.projects import bp as projects_bp
    from blueprints.search import bp as search_bp
    from blueprints.webhooks import bp as webhooks_bp

    for bp in (
        accounts_bp,
        dashboard_bp,
        chats_bp,
        devices_bp,
        projects_bp,
        notifications_bp,
        webhooks_bp,
        metrics_bp,
        audit_bp,
        api_bp,
        search_bp,
    ):
        app.register_blueprint(bp)
    register_live_routes(app)


def _register_cli(app: Flask) -> None:
    from blueprints.accounts.cli import demo_cli, users_cli
    from blueprints.dashboard.cli import serve_command
    from events.cli import events_cli

    app.cli.add_command(users_cli)
    app.cli.add_command(demo_cli)
    app.cli.add_command(events_cli)
    app.cli.add_command(serve_command)

    import click

    from blueprints.chats.cli_ops import COMMANDS as chat_commands

    chats_group = click.Group("chats", help="Chats: maintenance, exports and reports.")
    for command in chat_commands:
        chats_group.add_command(command)
    from blueprints.metrics.cli import metrics_command

    chats_group.add_command(metrics_command)
    app.cli.add_command(chats_group)

    from blueprints.projects.cli import projects_cli

    app.cli.add_command(projects_cli)

    from blueprints.devices.cli import devices_cli

    app.cli.add_command(devices_cli)


def _register_hooks(app: Flask) -> None:
    from models.accounts import User
    from services.accounts import user_for_session

    # Sessions and remember cookies carry a revocable, expiring identity rather than the
    # bare user id (get_id stays the id, for event actors).
    login_manager.id_attribute = "session_identity"

    @login_manager.user_loader
    def load_user(session_identity: str) -> User | None:
        return user_for_session(session_identity, app.config["REMEMBER_COOKIE_DURATION"])

    @app.before_request
    def start_embedded_worker() -> None:
        # Embedded mode runs its worker threads in the serving process, started on the
        # first request so `flask db upgrade` and other commands never start them.
        state = app.extensions["switchboard.tasks"]
        if state.embedded and app.config["START_EMBEDDED_WORKER"] and state.worker is None:
            state.start_embedded_worker()

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        hsts_max_age = app.config.get("HSTS_MAX_AGE", 0)
        if app.config.get("SESSION_COOKIE_SECURE") and hsts_max_age:
            # Secure cookies mean the site is served over https: browsers then refuse a
            # downgrade to http (where the cookie would not be sent anyway).
            response.headers.setdefault(
                "Strict-Transport-Security", f"max-age={hsts_max_age}; includeSubDomains"
            )
        if _is_personal(response) and "no-store" not in response.headers.get("Cache-Control", ""):
            # A logged-in page (an API token's page, a webhook secret, a tenant's data) must
            # not stay in a shared proxy's cache or the browser's after logout.
            response.headers["Cache-Control"] = "no-store"
        return response

    def _is_personal(response) -> bool:
        if request.endpoint == "static" or response.mimetype not in (
            "text/html",
            "application/json",
        ):
            return False
        return session.get("_user_id") is not None or g.get("api_user") is not None

    from services.rendering import markdown_to_safe_html

    app.jinja_env.filters["markdown"] = markdown_to_safe_html
    from services.devices import audio_percent, card_state, rf_percent

    app.jinja_env.filters["card_state"] = card_state
    app.jinja_env.filters["rf_percent"] = rf_percent
    app.jinja_env.filters["audio_percent"] = audio_percent
    from services.charts import as_utc

    # Timestamps go to the page as UTC instants; static/js/console.js shows them locally.
    app.jinja_env.filters["utc"] = as_utc

    @app.context_processor
    def inject_globals() -> dict[str, Any]:
        from services.live import sign_topics

        def live_token(names) -> str:
            # Every page listens to the user's own topics; pages add theirs via live_topics.
            topics = [*BASE_LIVE_TOPICS, *(names or ())]
            return sign_topics(current_user, topics) if topics else ""

        def unread_notifications() -> int:
            from services.notifications import unread_count

            return unread_count(current_user.id) if current_user.is_authenticated else 0

        return {
            "unread_notifications": unread_notifications,
            "current_user": current_user,
            "embedded_mode": app.config["EMBEDDED"],
            "live_token": live_token,
        }

    def bare_error_page(code: int, message: str) -> str:
        # Rendered without context processors: they load the current user and the bell's
        # count from the database, which may be the very thing that is failing.
        return app.jinja_env.get_template("error.html").render(code=code, message=message)

    def wants_json() -> bool:
        return request.path.startswith("/api/") or request.path == "/healthz"

    def error_page(code: int, message: str):
        """The error page, or for an htmx request only a short notice: htmx swaps 4xx
        answers like any other, and a whole page must not land inside a list."""
        from blueprints import is_partial_request

        if is_partial_request():
            response = app.make_response(
                (render_template("_error_fragment.html", code=code, message=message), code)
            )
            # Just before the element that asked, which stays: replacing it would leave the
            # page without the list (or form) the next, corrected request swaps into.
            response.headers["HX-Reswap"] = "beforebegin"
        else:
            response = app.make_response(
                (render_template("error.html", code=code, message=message), code)
            )
        response.headers.add("Vary", "HX-Request")
        return response

    @app.errorhandler(CSRFError)
    def csrf_error(error: CSRFError):
        if wants_json():
            return jsonify(error="csrf_failed", message=error.description), 400
        return error_page(400, error.description)

    @app.errorhandler(404)
    def not_found(error):
        if wants_json():
            return jsonify(error="not_found", message="Not found."), 404
        return error_page(404, "That page does not exist.")

    @app.errorhandler(403)
    def forbidden(error):
        if wants_json():
            return jsonify(error="forbidden", message="Not allowed."), 403
        return error_page(403, "You may not do that.")

    from werkzeug.exceptions import HTTPException

    @app.errorhandler(HTTPException)
    def client_error(error: HTTPException):
        # Every other 4xx (400, 405, 413, 429, …) in the app's own page or JSON, keeping the
        # headers it carries (Allow, Retry-After). Redirects raised by routing pass through.
        if error.code is None or not 400 <= error.code < 500:
            return error
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        message = error.description or error.name
        if wants_json():
            kind = error.name.lower().replace(" ", "_").replace("'", "")
            return jsonify(error=kind, message=message), error.code, headers
        response = error_page(error.code, message)
        response.headers.extend(headers)
        return response

    from sqlalchemy.exc import DataError

    @app.errorhandler(DataError)
    def value_out_of_range(error: DataError):
        # A value the database cannot hold (a number past a column's range, …): the request
        # was at fault, not the server. Routes check ids before they query; this is the net.
        logging.getLogger("switchboard").info(
            "database refused a value: %s", str(error.orig).splitlines()[0][:200]
        )
        db.session.rollback()
        message = "A value in the request is out of range."
        if wants_json():
            return jsonify(error="invalid_parameter", message=message), 400
        return error_page(400, message)

    from sqlalchemy.exc import InterfaceError, OperationalError

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_unavailable(error):
        # The database went away (restart, failover, network): say so and let the client
        # retry; the ping of idle connections (_ping_idle_connections) replaces the dead
        # connections once it is back.
        logging.getLogger("switchboard").warning(
            "database unavailable: %s", str(error).splitlines()[0][:200]
        )
        try:
            db.session.rollback()
            db.session.remove()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass
        message = "The database is unavailable right now. Try again in a moment."
        headers = {"Retry-After": "5"}
        if wants_json():
            return jsonify(error="database_unavailable", message=message), 503, headers
        return bare_error_page(503, message), 503, headers

    @app.errorhandler(500)
    def server_error(error):
        db.session.rollback()
        if wants_json():
            return jsonify(error="server_error", message="Something went wrong."), 500
        return bare_error_page(500, "Something went wrong on our side. Try again."), 500
