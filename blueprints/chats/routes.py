from datetime import datetime, time, timedelta
from urllib.parse import urlsplit

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import exists, func, select, update

from blueprints import (
    admin_required,
    get_owned_or_404,
    is_partial_request,
    keyset_page,
    parse_id,
    render,
)
from blueprints.chats import bp
from blueprints.chats.forms import AgentForm, OperatorReplyForm, WidgetSettingsForm
from extensions import db
from models.accounts import Tenant, User, new_widget_key
from models.chats import CHAT_STATUSES, Agent, Chat, Message
from services import chats
from services.live import render_fragment, snapshot

SENTIMENTS = ("positive", "neutral", "negative")
VIEWS = ("all", "mine", "unassigned")


def _view_clause(view: str):
    if view == "mine":
        return Chat.assignee_id == current_user.id
    if view == "unassigned":
        return Chat.assignee_id.is_(None)
    return None


@bp.app_context_processor
def inject_unread_chats():
    def unread_chats() -> int:
        if not current_user.is_authenticated:
            return 0
        return chats.unread_chat_count(current_user.tenant_id, current_user.id)

    return {"unread_chats": unread_chats}


def _date_arg(name: str):
    raw = request.args.get(name, "")
    if not raw:
        return None
    try:
        return datetime.strptime(raw, "%Y-%m-%d").date()
    except ValueError:  # a date field sends YYYY-MM-DD: this one was hand-made
        abort(400, description=f"“{name}” must be a date (YYYY-MM-DD).")


def _filtered_chats():
    args = request.args
    stmt = select(Chat).where(Chat.tenant_id == current_user.tenant_id)
    filters: dict[str, str] = {}
    if args.get("status") in CHAT_STATUSES:
        stmt = stmt.where(Chat.status == args["status"])
        filters["status"] = args["status"]
    if args.get("sentiment") in SENTIMENTS:
        stmt = stmt.where(
            exists().where(Message.chat_id == Chat.id, Message.sentiment_label == args["sentiment"])
        )
        filters["sentiment"] = args["sentiment"]
    view = args.get("view", "all")
    if view in VIEWS and view != "all":
        stmt = stmt.where(_view_clause(view))
        filters["view"] = view
    if args.get("escalated") == "1":
        stmt = stmt.where(Chat.escalated_at.is_not(None))
        filters["escalated"] = "1"
    agent_id = parse_id(args.get("agent"))  # a choice of the form's list; anything else: none
    if agent_id is not None:
        stmt = stmt.where(Chat.agent_id == agent_id)
        filters["agent"] = str(agent_id)
    start, end = _date_arg("from"), _date_arg("to")
    if start:
        stmt = stmt.where(Chat.created_at >= datetime.combine(start, time.min))
        filters["from"] = start.isoformat()
    if end:
        if end < end.max:  # up to the calendar's last day: no end at all
            next_day = datetime.combine(end + timedelta(days=1), time.min)
            stmt = stmt.where(Chat.created_at < next_day)
        filters["to"] = end.isoformat()
    q = args.get("q", "").strip()[:200]
    if q:
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(
            exists().where(Message.chat_id == Chat.id, Message.content.ilike(pattern, escape="\\"))
        )
        filters["q"] = q
    return stmt, filters


def _agents():
    return db.session.scalars(
        select(Agent).where(Agent.tenant_id == current_user.tenant_id).order_by(Agent.name)
    ).all()


@bp.get("/")
@login_required
def index():
    stmt, filters = _filtered_chats()
    rows, next_before = keyset_page(stmt, Chat.id, current_app.config["LIST_PAGE_SIZE"])
    # Escalated chats head their page; the count links to all of them, on any page.
    rows.sort(key=lambda chat: chat.escalated_at is None)
    escalated_count = db.session.scalar(
        select(func.count())
        .select_from(Chat)
        .where(Chat.tenant_id == current_user.tenant_id, Chat.escalated_at.is_not(None))
    )
    view_counts = chats.view_counts(current_user.tenant_id, current_user.id)
    return render(
        "chats/index.html",
        "chats/_rows.html",
        escalated_count=escalated_count,
        view=filters.get("view", "all"),
        view_counts=view_counts,
        unread_ids=chats.unread_chat_ids(current_user.id, [c.id for c in rows]),
        chats=rows,
        row_facts=chats.row_facts([c.id for c in rows]),
        next_before=next_before,
        filters=filters,
        agents=_agents(),
        statuses=CHAT_STATUSES,
        sentiments=SENTIMENTS,
        live_topics=["chats", "user:inbox"],
    )


def _conversation(chat: Chat):
    return chats.recent_messages(chat.id, 200)


@bp.get("/<int:chat_id>")
@login_required
def detail(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    chats.mark_read(chat, current_user.id)
    db.session.commit()
    return render(
        "chats/detail.html",
        chat=chat,
        messages=_conversation(chat),
        form=OperatorReplyForm(),
        agents=_agents(),
        operators=_operators(),
        live_topics=[f"chat:{chat.id}"],
    )


@snapshot("chat")
def chat_snapshot(tenant_id: int, user, chat_id: str = "") -> str:
    chat_pk = parse_id(chat_id)
    chat = db.session.get(Chat, chat_pk) if chat_pk is not None else None
    if chat is None or chat.tenant_id != tenant_id:
        return ""
    return render_fragment(
        "chats/_conversation.html", chat=chat, messages=_conversation(chat), oob=True
    ) + render_fragment("chats/_header.html", chat=chat, oob=True)


@snapshot("chats")
def chats_snapshot(tenant_id: int, user) -> str:
    return ""  # rows are pushed one by one; the list itself is rendered with the page


@snapshot("inbox")
def inbox_snapshot(tenant_id: int, user) -> str:
    # A page that reconnects may have missed count frames: it gets the count as it is now.
    count = chats.unread_chat_count(tenant_id, user.id)
    return render_fragment("chats/_nav_count.html", count=count, oob=True) + render_fragment(
        "chats/_view_counts.html", counts=chats.view_counts(tenant_id, user.id)
    )


def _operators():
    return db.session.scalars(
        select(User)
        .where(User.tenant_id == current_user.tenant_id, User.is_active_user.is_(True))
        .order_by(User.email)
    ).all()


def _back_to(chat: Chat):
    if is_partial_request():
        return "", 204
    return redirect(url_for("chats.detail", chat_id=chat.id), code=303)


@bp.post("/<int:chat_id>/reply")
@login_required
def reply(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    form = OperatorReplyForm()
    if not form.validate_on_submit():
        flash("Write a reply first (at most 4000 characters).", "error")
        return _back_to(chat)
    if chat.status == "archived":
        flash("This chat is archived.", "error")
        return _back_to(chat)
    chats.add_message(chat, "operator", form.content.data.strip())
    db.session.commit()
    return _back_to(chat)


@bp.post("/<int:chat_id>/takeover")
@login_required
def takeover(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    on = request.form.get("on") == "1"
    chats.set_takeover(chat, on, user_id=current_user.id)
    db.session.commit()
    flash("You have taken over this chat." if on else "The assistant answers again.", "info")
    return _back_to(chat)


@bp.post("/<int:chat_id>/assign")
@login_required
def assign(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    raw = request.form.get("assignee_id", "")
    assignee = None
    if raw:
        assignee_id = parse_id(raw)
        assignee = db.session.get(User, assignee_id) if assignee_id is not None else None
        if (
            assignee is None
            or assignee.tenant_id != current_user.tenant_id
            or not assignee.is_active_user
        ):
            abort(400, description="Choose an active operator of your team (or no one).")
    chats.assign(chat, assignee.id if assignee else None)
    db.session.commit()
    flash(f"Assigned to {assignee.email}." if assignee else "Unassigned.", "info")
    return _back_to(chat)


@bp.post("/<int:chat_id>/resolve-escalation")
@login_required
def resolve_escalation(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    if chats.resolve_escalation(chat):
        db.session.commit()
        flash("Escalation resolved.", "info")
    else:
        flash("This chat is not escalated.", "info")
    return _back_to(chat)


@bp.post("/<int:chat_id>/complete")
@login_required
def complete(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    if request.form.get("confirm") != "complete":
        # Ending a conversation is not undone: only the confirmation page's button does it.
        return render_template("chats/complete.html", chat=chat)
    chats.complete_chat(chat)
    db.session.commit()
    return _back_to(chat)


@bp.post("/<int:chat_id>/agent")
@login_required
def change_agent(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    agent_id = parse_id(request.form.get("agent_id"))
    agent = db.session.get(Agent, agent_id) if agent_id is not None else None
    if agent is None or agent.tenant_id != current_user.tenant_id:
        abort(404)
    chats.change_agent(chat, agent)
    db.session.commit()
    return _back_to(chat)


# ------------------------------------------------------------------ agents


@bp.get("/agents")
@login_required
def agents():
    return render("chats/agents.html", agents=_agents())


def _save_agent(agent: Agent, form: AgentForm) -> None:
    form.populate_obj(agent)
    agent.tenant_id = current_user.tenant_id
    db.session.add(agent)
    db.session.flush()
    if agent.is_default:
        db.session.execute(
            update(Agent)
            .where(Agent.tenant_id == agent.tenant_id, Agent.id != agent.id)
            .values(is_default=False)
        )


@bp.route("/agents/new", methods=["GET", "POST"])
@admin_required
def new_agent():
    form = AgentForm()
    if form.validate_on_submit():
        _save_agent(Agent(), form)
        db.session.commit()
        flash("Agent created.", "info")
        return redirect(url_for("chats.agents"), code=303)
    return render("chats/agent_form.html", form=form, agent=None)


@bp.route("/agents/<int:agent_id>", methods=["GET", "POST"])
@admin_required
def edit_agent(agent_id: int):
    agent = get_owned_or_404(Agent, agent_id)
    form = AgentForm(obj=agent)
    if form.validate_on_submit():
        _save_agent(agent, form)
        db.session.commit()
        flash("Agent saved.", "info")
        return redirect(url_for("chats.agents"), code=303)
    return render("chats/agent_form.html", form=form, agent=agent)


# ------------------------------------------------------------------ widget settings


def _valid_origin(line: str) -> bool:
    parts = urlsplit(line)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.path.strip("/")


@bp.route("/settings", methods=["GET", "POST"])
@admin_required
def settings():
    tenant = db.session.get(Tenant, current_user.tenant_id)
    form = WidgetSettingsForm(obj=tenant)
    if form.validate_on_submit():
        lines = [ln.strip().rstrip("/") for ln in (form.allowed_origins.data or "").splitlines()]
        lines = [ln for ln in lines if ln]
        bad = [ln for ln in lines if not _valid_origin(ln)]
        if bad:
            form.allowed_origins.errors = [f"Not an origin: {bad[0]} (use scheme://host[:port])"]
        else:
            tenant.allowed_origins = "\n".join(dict.fromkeys(lines))
            db.session.commit()
            flash("Widget settings saved.", "info")
            return redirect(url_for("chats.settings"), code=303)
    snippet_src = url_for("static", filename="widget.js", _external=True)
    return render("chats/settings.html", form=form, tenant=tenant, snippet_src=snippet_src)


@bp.post("/settings/rotate-key")
@admin_required
def rotate_widget_key():
    tenant = db.session.get(Tenant, current_user.tenant_id)
    tenant.widget_key = new_widget_key()
    db.session.commit()
    flash("New widget key issued; update the snippet on your site.", "info")
    return redirect(url_for("chats.settings"), code=303)
