"""`flask chats …` maintenance commands (added to the `chats` command group in app.py)."""

from __future__ import annotations

import csv
import json
import sys
import time
import uuid
from datetime import timedelta

import click
from flask.cli import with_appcontext
from sqlalchemy import delete, func, select, update

from events.outbox import emit, to_primitive
from extensions import db
from models.base import utcnow
from models.chats import Chat, Message
from services import chats as chat_service
from services.assistant import is_configured
from services.lexicons import learned
from services.sentiment import BACKENDS, LABELS, backend_name, evaluate


def _find_chat(ref: str) -> Chat | None:
    if ref.isdigit():
        return db.session.get(Chat, int(ref))
    try:
        key = uuid.UUID(ref)
    except ValueError:
        return None
    return db.session.scalar(select(Chat).where(Chat.public_id == key))


@click.command("cleanup")
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1))
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@with_appcontext
def cleanup_command(days: int, dry_run: bool) -> None:
    """Delete archived and completed chats with no activity for DAYS days."""
    cutoff = utcnow() - timedelta(days=days)
    ids = db.session.scalars(
        select(Chat.id)
        .where(Chat.status.in_(("archived", "completed")), Chat.last_activity < cutoff)
        .order_by(Chat.id)
    ).all()
    messages = (
        db.session.scalar(select(func.count()).select_from(Message).where(Message.chat_id.in_(ids)))
        if ids
        else 0
    )
    if dry_run:
        click.echo(f"Would delete {len(ids)} chats and {messages} messages older than {days} days.")
        return
    with click.progressbar(range(0, len(ids), 200), label="Deleting chats") as batches:
        for start in batches:
            batch = ids[start : start + 200]
            for chat in db.session.scalars(select(Chat).where(Chat.id.in_(batch))):
                db.session.delete(chat)  # through the ORM: each deletion is an event
            db.session.commit()
    click.echo(f"Deleted {len(ids)} chats and {messages} messages.")


@click.command("validate")
@click.option("--fix", is_flag=True, help="Repair what can be repaired.")
@with_appcontext
def validate_command(fix: bool) -> None:
    """Find chats without messages, message_count drift and orphaned messages."""
    counts = dict(
        db.session.execute(select(Message.chat_id, func.count()).group_by(Message.chat_id)).all()
    )
    empty, drift = [], []
    rows = db.session.execute(select(Chat.id, Chat.message_count, Chat.status)).all()
    with click.progressbar(rows, label="Checking chats") as progress:
        for chat_id, recorded, status in progress:
            actual = counts.get(chat_id, 0)
            if actual == 0 and status != "active":
                empty.append(chat_id)
            if recorded != actual:
                drift.append((chat_id, recorded, actual))
    orphans = db.session.scalars(
        select(Message.id)
        .outerjoin(Chat, Chat.id == Message.chat_id)
        .where((Chat.id.is_(None)) | (Chat.tenant_id != Message.tenant_id))
    ).all()
    click.echo(f"Chats without messages (not active): {len(empty)}")
    click.echo(f"Chats whose message_count is wrong: {len(drift)}")
    for chat_id, recorded, actual in drift[:20]:
        click.echo(f"  chat {chat_id}: says {recorded}, has {actual}")
    click.echo(f"Orphaned messages: {len(orphans)}")
    if not fix:
        if empty or drift or orphans:
            click.echo("Run with --fix to repair.")
        return
    for chat_id, _, actual in drift:
        db.session.execute(update(Chat).where(Chat.id == chat_id).values(message_count=actual))
    if orphans:
        db.session.execute(delete(Message).where(Message.id.in_(orphans)))
    for chat in db.session.scalars(select(Chat).where(Chat.id.in_(empty))):
        db.session.delete(chat)
    db.session.commit()
    click.echo(
        f"Fixed: {len(drift)} counts, deleted {len(orphans)} orphans and {len(empty)} empty chats."
    )


@click.command("anonymize")
@click.option("--user-id", type=int, help="Every chat of this signed-in user.")
@click.option("--visitor-id", help="Every chat of this anonymous widget visitor.")
@click.option("--chat-id", "chat_ref", help="One chat, by its number or public id.")
@with_appcontext
def anonymize_command(user_id: int | None, visitor_id: str | None, chat_ref: str | None) -> None:
    """Erase a person's words from their chats, and everywhere they were copied: every
    message of those chats (replies quote the visitor), titles, summaries, the events and
    audit records about them, notification excerpts, copies in any other table and the
    live bus's frames. The chats stay, anonymous, with their counts and times."""
    chosen = [o for o in (user_id is not None, bool(visitor_id), bool(chat_ref)) if o]
    if len(chosen) != 1:
        raise click.UsageError("Give exactly one of --user-id, --visitor-id or --chat-id.")
    chat_ids = chat_service.chats_to_erase(
        user_id=user_id, visitor_id=visitor_id, chat_ref=chat_ref
    )
    whose = (
        f"user {user_id}"
        if user_id is not None
        else f"visitor {visitor_id!r}"
        if visitor_id
        else f"chat {chat_ref!r}"
    )
    if not chat_ids:
        raise click.ClickException(f"No chats belong to {whose}.")
    erasure = chat_service.erase_chats(chat_ids)
    db.session.commit()
    try:
        chat_service.erase_live_frames(erasure)
    except chat_service.ChatError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(
        f"Anonymised {erasure.chats} chats of {whose}: {erasure.messages} messages erased, "
        f"{erasure.copies} copies elsewhere erased, {erasure.live_frames} live frames removed."
    )


@click.command("archive-inactive")
@with_appcontext
def archive_inactive_command() -> None:
    """Archive (and summarise) completed chats and chats idle past CHAT_INACTIVITY_HOURS."""
    candidates = chat_service.archive_candidates(limit=100_000)
    with click.progressbar(candidates.ids, label="Archiving chats") as progress:
        for chat_id in progress:
            chat = db.session.get(Chat, chat_id)
            if chat is not None:
                chat_service.archive_chat(chat)
                db.session.commit()
    click.echo(f"Archived {len(candidates.ids)} chats.")


@click.command("export")
@click.option("--chat-id", "ref", required=True, help="The chat's number or public id.")
@with_appcontext
def export_command(ref: str) -> None:
    """Print one chat with all its messages as JSON."""
    chat = _find_chat(ref)
    if chat is None:
        raise click.ClickException(f"No chat {ref!r}.")
    messages = db.session.scalars(
        select(Message).where(Message.chat_id == chat.id).order_by(Message.created_at, Message.id)
    ).all()
    columns = [c.key for c in Chat.__table__.columns]
    data = {key: to_primitive(getattr(chat, key)) for key in columns}
    message_columns = [c.key for c in Message.__table__.columns]
    data["messages"] = [
        {key: to_primitive(getattr(m, key)) for key in message_columns} for m in messages
    ]
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    emit(
        "chat.exported",
        tenant_id=chat.tenant_id,
        entity="chat",
        entity_id=chat.id,
        payload={"label": f"Chat {chat.public_id} exported from the command line"},
    )
    db.session.commit()


EVAL_COLUMNS = ("label", "lang", "text")


def read_eval_rows(path: str, split: str | None) -> list[tuple[str, str, str]]:
    """(label, language, text) rows of a labelled TSV file with a header line naming at least
    the columns label, lang and text (a `split` column, if any, can select rows)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in EVAL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise click.ClickException(
                f"{path}: the first line must name the tab-separated columns label, lang and "
                f"text (missing: {', '.join(missing)})."
            )
        if split and "split" not in reader.fieldnames:
            raise click.ClickException(f"{path} has no `split` column to choose {split!r} from.")
        rows = []
        for number, row in enumerate(reader, 2):
            label = (row.get("label") or "").strip().lower()
            language = (row.get("lang") or "").strip().lower()
            text = row.get("text") or ""
            if not label and not text.strip():
                continue  # a blank line
            if label not in LABELS:
                raise click.ClickException(
                    f"{path}:{number}: label must be negative, neutral or positive, not {label!r}."
                )
            if not language or not text.strip():
                raise click.ClickException(f"{path}:{number}: the lang and text are required.")
            if split and (row.get("split") or "").strip() != split:
                continue
            rows.append((label, language, text))
    if not rows:
        raise click.ClickException(f"{path}: no labelled messages to evaluate.")
    return rows


@click.command("sentiment-eval")
@click.argument("path", metavar="FILE.tsv", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    help="Score with this backend instead of SENTIMENT_BACKEND.",
)
@click.option("--compare", is_flag=True, help="Also print every other backend's figures.")
@click.option("--split", help="Only the rows whose `split` column has this value.")
@click.option("--confusions", is_flag=True, help="List the messages scored wrongly.")
@with_appcontext
def sentiment_eval_command(
    path: str, backend: str | None, compare: bool, split: str | None, confusions: bool
) -> None:
    """Accuracy, escalation recall and false escalations per language on a labelled TSV file
    (columns label, lang, text; label negative|neutral|positive). A message escalates when
    the backend labels it negative; the last lines are one per language, for scripts."""
    rows = read_eval_rows(path, split)
    chosen = backend_name(backend)
    others = [b for b in BACKENDS if b != chosen] if compare else []
    if "llm" in others and not is_configured():
        click.echo("backend=llm skipped: no OPENAI_API_KEY or OPENAI_BASE_URL is configured")
        others.remove("llm")
    for name in [*others, chosen]:
        started = time.perf_counter()
        results = evaluate(rows, backend=name)
        elapsed_ms = (time.perf_counter() - started) * 1000 / len(rows)
        click.echo(f"backend={name} ({elapsed_ms:.2f} ms a message)")
        for result in results.values():
            click.echo(
                f"  {result.language}: {result.n} messages, accuracy {result.accuracy:.2f}, "
                f"escalated {result.negatives_escalated}/{result.negatives} negatives, "
                f"{result.others_escalated}/{result.others} others"
                + (f" ({result.fallbacks} by the offline fallback)" if result.fallbacks else "")
            )
            if confusions:
                for label, got, score, text in result.confusions:
                    click.echo(f"    {label} -> {got} ({score:+.2f}): {text}")
    for result in results.values():
        click.echo(result.line())


@click.command("sentiment-train")
@click.option(
    "--corpus",
    "corpus",
    type=click.Path(exists=True, file_okay=False),
    default=str(learned.CORPUS_DIR),
    show_default=True,
    help="Directory of labelled TSV files (label, lang, text) to learn from.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Where the table of weights goes (default: SENTIMENT_TABLE when set, else the "
    "table shipped in services/lexicons/learned.tsv).",
)
@click.option(
    "--max-false-escalation",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    show_default=True,
    help="The threshold is the lowest whose cross-validated false escalations stay under this "
    "in every language.",
)
@with_appcontext
def sentiment_train_command(corpus: str, out: str | None, max_false_escalation: float) -> None:
    """Learn the offline analyser's complaint weights from a labelled corpus: the penalty and
    the threshold by cross-validation, then the weights from every message."""
    from pathlib import Path

    from services.sentiment import lexicon_score

    paths = sorted(Path(corpus).glob("*.tsv"))
    if not paths:
        raise click.ClickException(f"{corpus} holds no .tsv files to learn from.")
    try:
        examples = learned.read_corpus(paths)
    except learned.TableError as exc:
        raise click.ClickException(str(exc)) from None
    counts = {}
    for example in examples:
        counts[(example.language, example.label)] = (
            counts.get((example.language, example.label), 0) + 1
        )
    click.echo(
        f"{len(examples)} messages from {len(paths)} files: "
        + ", ".join(f"{lang} {label} {n}" for (lang, label), n in sorted(counts.items()))
    )
    started = time.perf_counter()
    training = learned.train(
        examples,
        lexicon_score,
        max_false=max_false_escalation,
        progress=lambda line: click.echo(f"  {line} ({time.perf_counter() - started:.0f} s)"),
    )
    lines = learned.table_lines(training, [p.name for p in paths])
    out = out or str(learned.table_path())
    try:
        Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    learned.load_table.cache_clear()
    click.echo(f"wrote {out}: {training.features} features, threshold {training.table.threshold}")
    for language, figures in training.cross_validated.items():
        click.echo(
            f"lang={language} cross-validated recall={figures.recall:.2f} "
            f"false_escalation={figures.false_escalation:.2f}"
        )


COMMANDS = [
    cleanup_command,
    validate_command,
    anonymize_command,
    archive_inactive_command,
    export_command,
    sentiment_eval_command,
    sentiment_train_command,
]
