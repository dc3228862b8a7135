"""Customer satisfaction (CSAT): what visitors said when they rated their chats.

Counted by when the rating was given (`rated_at`), over the Metrics page's range: the
average, how many gave each score from 1 to 5, per operator (the chat's assignee; chats no
operator took are the assistant's), and the latest comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import func, select

from extensions import db
from models.accounts import User
from models.chats import Chat

RECENT_COMMENTS = 10


@dataclass
class AgentScores:
    name: str
    responses: int
    average: float


@dataclass
class Comment:
    chat_id: int
    label: str
    score: int
    text: str
    rated_at: datetime


@dataclass
class CsatReport:
    responses: int = 0
    average: float | None = None
    # score -> (count, share of responses in percent), for 1..5 in order
    distribution: list[tuple[int, int, int]] = field(default_factory=list)
    per_agent: list[AgentScores] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)


def _bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )


def csat_report(tenant_id: int, start: date, end: date) -> CsatReport:
    since, until = _bounds(start, end)
    rated = (
        Chat.tenant_id == tenant_id,
        Chat.satisfaction.is_not(None),
        Chat.rated_at >= since,
        Chat.rated_at < until,
    )
    counts = dict(
        db.session.execute(
            select(Chat.satisfaction, func.count()).where(*rated).group_by(Chat.satisfaction)
        ).all()
    )
    report = CsatReport()
    report.responses = sum(counts.values())
    if not report.responses:
        return report
    report.average = round(sum(s * n for s, n in counts.items()) / report.responses, 2)
    report.distribution = [
        (score, counts.get(score, 0), round(100 * counts.get(score, 0) / report.responses))
        for score in range(1, 6)
    ]
    rows = db.session.execute(
        select(User.name, User.email, func.count(), func.avg(Chat.satisfaction))
        .select_from(Chat)
        .outerjoin(User, User.id == Chat.assignee_id)
        .where(*rated)
        .group_by(Chat.assignee_id, User.name, User.email)
    ).all()
    report.per_agent = sorted(
        (
            AgentScores(
                name=(name or email) if (name or email) else "Assistant (no operator)",
                responses=n,
                average=round(float(avg), 2),
            )
            for name, email, n, avg in rows
        ),
        key=lambda row: (-row.responses, row.name),
    )
    recent = db.session.scalars(
        select(Chat)
        .where(*rated, Chat.satisfaction_comment.is_not(None))
        .order_by(Chat.rated_at.desc(), Chat.id.desc())
        .limit(RECENT_COMMENTS)
    ).all()
    report.comments = [
        Comment(c.id, c.visitor_label(), c.satisfaction, c.satisfaction_comment, c.rated_at)
        for c in recent
    ]
    return report
