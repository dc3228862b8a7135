"""Tenant-scoped live topics: naming, signing, publishing and snapshots.

A page is rendered with a signed token naming the exact topics it may subscribe to; /ws/live
accepts only a token signed by this server, for the logged-in user it was made for, naming
topics of that user's tenant.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

from flask import current_app, has_request_context, render_template
from flask.ctx import RequestContext
from itsdangerous import BadSignature, URLSafeTimedSerializer

from events.live import encode
from events.outbox import around_commit_callbacks, at_commit, in_handler_transaction, on_commit

log = logging.getLogger(__name__)
SnapshotFn = Callable[..., str]
_USER_SEGMENT = re.compile(r"u\d+")
_snapshots: dict[str, SnapshotFn] = {}


def tenant_topic(tenant_id: int, name: str) -> str:
    return f"t{tenant_id}:{name}"


def user_topic(tenant_id: int, user_id: int, name: str) -> str:
    return f"t{tenant_id}:u{user_id}:{name}"


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt="live-topics")


def topic_for(user: Any, name: str) -> str:
    """ "feed" → the tenant's feed topic; "user:bell" → this user's own bell topic."""
    if name.startswith("user:"):
        return user_topic(user.tenant_id, user.id, name[len("user:") :])
    return tenant_topic(user.tenant_id, name)


def sign_topics(user: Any, names: Iterable[str]) -> str:
    topics = [topic_for(user, n) for n in names]
    return _serializer().dumps({"u": int(user.id), "t": topics})


def verify_topics(token: str, user: Any) -> list[str] | None:
    """The topics the token grants to this user, or None if it grants nothing."""
    try:
        data = _serializer().loads(token, max_age=current_app.config["LIVE_TOKEN_MAX_AGE"])
    except BadSignature:
        return None
    if not isinstance(data, dict) or data.get("u") != int(user.id):
        return None
    topics = data.get("t")
    prefix = f"t{user.tenant_id}:"
    if not isinstance(topics, list) or not topics:
        return None
    for topic in topics:
        if not isinstance(topic, str) or not topic.startswith(prefix):
            return None
        parts = topic.split(":")
        # A user-scoped topic ("t1:u7:bell") belongs to that user alone.
        if len(parts) > 2 and _USER_SEGMENT.fullmatch(parts[1]) and parts[1] != f"u{user.id}":
            return None
    return topics


def bus():
    return current_app.extensions["switchboard.live"].bus


def hub():
    return current_app.extensions["switchboard.live"].hub


def pages():
    """This process's sender of the pages' live frames (events.fanout.Broadcaster)."""
    return current_app.extensions["switchboard.live"].pages


def chat_pump():
    """This process's mover of the chat sockets' frames (events.fanout.SocketPump)."""
    return current_app.extensions["switchboard.live"].chats


def publish(topic: str, key: str, *, html: str | None = None, json_data: Any = None) -> str:
    return bus().publish(topic, encode(key, html=html, json_data=json_data))


def publish_after_commit(topic: str, key: str, *, html: str | None = None, json_data: Any = None):
    """Publish once the transaction commits. A commit's frames go out together, in one
    round trip, when its last after-commit callback has run (a batch of fifty device events
    publishes a hundred and fifty frames).

    In an event handler's transaction they go out at the commit instead, just before it
    (events.outbox.at_commit): the handlers' records are in that commit, so a worker that
    died after it and before its callbacks would lose the frames for good (a redelivery
    skips recorded handlers). Should the COMMIT fail, the message is retried and its frames
    sent again; a frame for what was not committed is replaced by the next one or by the
    page's next snapshot."""
    app = current_app._get_current_object()
    data = encode(key, html=html, json_data=json_data)

    def _send() -> None:
        gathered = getattr(_gathering, "frames", None)
        if gathered is not None:
            gathered.append((app, topic, data))
            return
        with app.app_context():
            bus().publish(topic, data)

    if in_handler_transaction():
        at_commit(_send)
    else:
        on_commit(_send)


_RENDERS = "live.renders"


def watched_topics(topics: set[str]) -> tuple[set[str], int | None]:
    """Which of these page topics some open page watches (Hub.subscribe(watch=True)), and
    the watch generation (see RedisBus.watched); Redis unreachable: all of them, as nobody
    can say they are unwatched, and no generation."""
    try:
        return bus().watched(topics)
    except Exception as exc:  # noqa: BLE001 - unsure: render them all
        log.warning("watched topics not read (%s): rendering every frame", exc)
        return topics, None


def publish_if_watched(frames: list[tuple[str, str, Callable[[], str]]]) -> None:
    """Publish after the commit, as publish_after_commit, each frame (topic, key, render) of
    a *page* topic that some open page watches; `render()` (its html) runs only for those.
    For the work just before a transaction commits (events.outbox.before_commit).

    A page takes a snapshot whenever its socket connects, and registers its topics as
    watched before that (Hub.subscribe(watch=True)), so a frame nobody watches is work for
    nobody: with no dashboard open, most of a device event's rendering was. Should a page
    start watching after this check, its snapshot may have read the database before this
    commit: after the commit the watch generation says whether any topic gained a watcher
    meanwhile, and the frames skipped for those topics are rendered and published then
    (from the committed rows). Redis unreachable: everything is rendered, as before.

    Not for topics read otherwise than by a page's socket: a widget's chat topic is read
    back from its stream on reconnect."""
    if not frames:
        return
    watched, generation = watched_topics({topic for topic, _key, _render in frames})
    skipped = []
    with fragments():
        for topic, key, render in frames:
            if topic in watched:
                publish_after_commit(topic, key, html=render())
            else:
                skipped.append((topic, key, render))
    if skipped:
        on_commit(functools.partial(_publish_late, skipped, generation))


def _publish_late(
    skipped: list[tuple[str, str, Callable[[], str]]], generation: int | None
) -> None:
    """After the commit of frames skipped as unwatched: those of topics a page began
    watching since the check (its snapshot may have missed the commit), rendered now."""
    try:
        if bus().watch_generation() == generation:
            return  # no topic gained a watcher: nobody can have missed these
        watched, _ = bus().watched({topic for topic, _key, _render in skipped})
        if not watched:
            return
        with fragments():
            for topic, key, render in skipped:
                if topic in watched:
                    publish(topic, key, html=render())
    except Exception:  # noqa: BLE001 - best effort, as any live frame: the page's next
        log.exception("late live frames not published")  # snapshot heals it


def publish_fragment_after_commit(
    topic: str,
    key: str,
    template: str,
    *,
    replaces: bool = False,
    macro: str | None = None,
    **context: Any,
) -> None:
    """render_fragment(template, **context) (with `macro`: render_macro(template, macro,
    **context)), published as publish_after_commit would.

    In a batch of events (one commit's, run in one transaction by tasks/broker.py) the
    fragments are rendered together just before the batch commits, under one request
    context, from the objects as the batch left them; with `replaces` (a frame that replaces
    what its key names, like a device card) a later one of the same topic and key takes the
    place of an earlier one, so a device with three events in a batch is rendered once.
    Outside a batch it renders at once."""
    from events.outbox import before_commit
    from events.registry import batch_cache
    from extensions import db

    cache = batch_cache(db.session())
    if cache is None:
        html = (
            render_macro(template, macro, **context)
            if macro
            else render_fragment(template, **context)
        )
        publish_after_commit(topic, key, html=html)
        return
    pending = cache.get(_RENDERS)
    if pending is None:
        pending = cache[_RENDERS] = {}

        def render_all() -> None:
            if cache.get(_RENDERS) is pending:
                del cache[_RENDERS]  # anything published after this starts anew
            publish_if_watched(
                [
                    (
                        frame_topic,
                        frame_key,
                        functools.partial(render_macro, name, macro_name, **kwargs)
                        if macro_name
                        else functools.partial(render_fragment, name, **kwargs),
                    )
                    for (frame_topic, frame_key, _), (name, macro_name, kwargs) in pending.items()
                ]
            )

        before_commit(render_all)
    # Appends keep their place (and each its own entry); a replacing frame moves to the end.
    slot = (topic, key, None if replaces else len(pending))
    pending.pop(slot, None)
    pending[slot] = (template, macro, context)


_gathering = threading.local()


@contextmanager
def _gather_frames():
    outer = getattr(_gathering, "frames", None)
    if outer is not None:  # a commit inside a callback: its frames join the outer ones
        yield
        return
    _gathering.frames = frames = []
    try:
        yield
    finally:
        _gathering.frames = None
        _publish_gathered(frames)


def _publish_gathered(frames: list[tuple[Any, str, str]]) -> None:
    by_app: dict[Any, list[tuple[str, str]]] = {}
    for app, topic, data in frames:
        by_app.setdefault(app, []).append((topic, data))
    for app, items in by_app.items():
        try:
            with app.app_context():
                bus().publish_many(items)
        except Exception:  # noqa: BLE001 - live frames are best effort; pages resnapshot
            log.exception("could not publish %s live frames after a commit", len(items))


around_commit_callbacks(_gather_frames)


def render_macro(template: str, macro: str, **arguments: Any) -> str:
    """Call one macro of a template, as a page that imports it does: the template's module
    is made once (imported without context, its macros see the app's globals, url_for and
    config, and only their arguments). For a fragment rendered per event, this is about
    half the cost of rendering a template that imports the macro and calls it (a context of
    its own each time, and the import's bookkeeping). Outside a request it runs inside
    fragments() (url_for needs a request context)."""
    if not has_request_context():
        with fragments():
            return render_macro(template, macro, **arguments)
    module = current_app.jinja_env.get_template(template).module
    return str(getattr(module, macro)(**arguments))


def render_fragment(template: str, **context: Any) -> str:
    """Render a partial from a worker too (url_for needs a request context).

    Outside a request (workers render a fragment per event) the context is made from a
    WSGI environ built once per app for PUBLIC_URL, with a null session: there is no
    visitor's cookie to open, and a fragment must not write one. So its forms get an empty
    CSRF field, which static/js/app.js fills with the page's token when one is submitted
    (a token made here would belong to no one's session and be refused)."""
    scope = getattr(_fragments, "scope", None)
    if scope is not None:
        context.setdefault("csrf_token", _no_csrf_token)
        return scope.render(template, context)
    if has_request_context():
        return render_template(template, **context)
    context.setdefault("csrf_token", _no_csrf_token)
    with _worker_request_context():
        return render_template(template, **context)


def _worker_request_context() -> RequestContext:
    app = current_app._get_current_object()
    null_session = app.session_interface.make_null_session(app)
    return RequestContext(app, dict(_worker_environ(app)), session=null_session)


_fragments = threading.local()


@contextmanager
def fragments():
    """Render many fragments under one worker request context, rather than one each (its
    set-up and tear-down cost about as much as rendering a small fragment). Only around
    rendering: inside it the code runs as in a request, which the rest of a handler must
    not (an event emitted there would take the fake request's address as its actor's)."""
    if has_request_context():
        yield
        return
    with _worker_request_context():
        _fragments.scope = _FragmentScope(current_app._get_current_object())
        try:
            yield
        finally:
            _fragments.scope = None


class _FragmentScope:
    """Renders as flask.render_template does, with the context processors' values taken
    once for the scope: they are the same for every fragment of one (fake) request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.base: dict[str, Any] = {}
        app.update_template_context(self.base)

    def render(self, name: str, context: dict[str, Any]) -> str:
        from flask.signals import before_render_template, template_rendered

        if before_render_template.receivers or template_rendered.receivers:
            return render_template(name, **context)  # someone listens: Flask's own path
        return self.app.jinja_env.get_template(name).render({**self.base, **context})


def _no_csrf_token() -> str:
    return ""


def _worker_environ(app: Any) -> dict[str, Any]:
    environ = app.extensions.get("switchboard.worker_environ")
    if environ is None:
        from werkzeug.test import EnvironBuilder

        base_url = app.config.get("PUBLIC_URL") or "http://localhost/"
        environ = EnvironBuilder(base_url=base_url).get_environ()
        app.extensions["switchboard.worker_environ"] = environ
    return environ


def snapshot(name: str):
    """Register the renderer of a topic's snapshot: fn(tenant_id, user, *args) -> OOB html.

    "t1:feed" calls the "feed" renderer; "t1:chat:5" calls "chat" with "5";
    "t1:u7:bell" calls "bell". The topic was verified for this user before."""

    def decorate(fn: SnapshotFn) -> SnapshotFn:
        _snapshots[name] = fn
        return fn

    return decorate


def render_snapshot(topic: str, user: Any) -> str:
    parts = topic.split(":")[1:]
    if parts and _USER_SEGMENT.fullmatch(parts[0]):
        parts = parts[1:]
    if not parts:
        return ""
    fn = _snapshots.get(parts[0])
    return fn(user.tenant_id, user, *parts[1:]) if fn else ""
