from flask import current_app
from flask_login import login_required
from sqlalchemy import select

from blueprints import get_owned_or_404, keyset_page, render, scoped
from blueprints.chats import bp
from extensions import db
from models.chats import Chat, Message


@bp.get("/")
@login_required
def index():
    stmt = scoped(select(Chat), Chat)
    chats, next_before = keyset_page(stmt, Chat.id, current_app.config["LIST_PAGE_SIZE"])
    return render("chats/index.html", "chats/_rows.html", chats=chats, next_before=next_before)


@bp.get("/<int:chat_id>")
@login_required
def detail(chat_id: int):
    chat = get_owned_or_404(Chat, chat_id)
    messages = db.session.scalars(
        select(Message).where(Message.chat_id == chat.id).order_by(Message.created_at, Message.id)
    ).all()
    return render("chats/detail.html", chat=chat, messages=messages)
