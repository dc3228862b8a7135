"""Demo data for `flask demo load` (idempotent: running it twice adds nothing)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from sqlalchemy import select

from extensions import db
from models.accounts import Tenant, User
from models.base import utcnow
from models.chats import Agent, Chat, Message
from models.devices import Device, Location, Manufacturer
from models.projects import Project
from services import metrics, projects
from services.accounts import create_user, get_or_create_tenant
from services.chats import DEFAULT_SETTINGS, agent_settings_for

DEMO_TENANT = "Demo"

DEMO_CHATS = [
    (
        "Shipping question",
        [
            ("visitor", "Hi! When will my order ship?"),
            ("assistant", "Orders ship within two working days."),
        ],
    ),
    (
        "Microphone keeps cutting out",
        [
            ("visitor", "My receiver drops every few minutes."),
            ("assistant", "Let's check the RF levels together."),
        ],
    ),
    ("Thanks!", [("visitor", "That fixed it, thank you so much!")]),
]

# The demo's receivers, as a Shure receiver names itself (its DEVICE_ID), and their models.
# `flask serve` with DEVICES_SIMULATOR_RECEIVERS (make run: 4) simulates exactly these first,
# so the polls find them; their transmitters are discovered then.
DEMO_RECEIVERS = [
    ("STAGE-LEFT", "ULXD4D"),
    ("STAGE-RIGHT", "ULXD4D"),
    ("FOH", "QLXD4"),
    ("BAND-RACK", "AD4D"),
]


# Days of made-up metrics before today, so a new user's Metrics page shows a month of charts.
DEMO_HISTORY_DAYS = 29
DEMO_HISTORY_SEED = 2202


@dataclass
class DemoResult:
    created: list[str] = field(default_factory=list)
    email: str = ""
    password: str = ""

    def describe(self) -> str:
        what = ", ".join(self.created) if self.created else "nothing new (already loaded)"
        return f"Demo data: {what}.\nLog in as {self.email} / {self.password}"


def _manufacturer(code: str, name: str) -> Manufacturer:
    found = db.session.scalar(select(Manufacturer).where(Manufacturer.code == code))
    if found is None:
        found = Manufacturer(code=code, name=name)
        db.session.add(found)
        db.session.flush()
    return found


def load_demo() -> DemoResult:
    cfg = current_app.config
    result = DemoResult(email=cfg["DEMO_EMAIL"], password=cfg["DEMO_PASSWORD"])
    tenant = db.session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
    if tenant is None:
        tenant = get_or_create_tenant(DEMO_TENANT)
        result.created.append("tenant")
    if db.session.scalar(select(User).where(User.email == cfg["DEMO_EMAIL"])) is None:
        create_user(
            cfg["DEMO_EMAIL"], cfg["DEMO_PASSWORD"], tenant, role="admin", name="Demo Admin"
        )
        result.created.append("admin login")

    agent = db.session.scalar(
        select(Agent).where(Agent.tenant_id == tenant.id, Agent.is_default.is_(True))
    )
    if agent is None:
        agent = Agent(
            tenant_id=tenant.id,
            name="Support assistant",
            is_default=True,
            model=cfg["OPENAI_MODEL"],
            system_prompt="You are the friendly support assistant of Demo Ltd.",
        )
        db.session.add(agent)
        db.session.flush()
        result.created.append("default agent")

    existing_titles = set(db.session.scalars(select(Chat.title).where(Chat.tenant_id == tenant.id)))
    now = utcnow()
    for index, (title, lines) in enumerate(DEMO_CHATS):
        if title in existing_titles:
            continue
        started = now - timedelta(hours=3 * (len(DEMO_CHATS) - index))
        chat = Chat(
            tenant_id=tenant.id,
            agent_id=agent.id,
            title=title,
            visitor_id=f"demo-{index}",
            last_activity=started,
            message_count=len(lines),
            settings={**DEFAULT_SETTINGS, **agent_settings_for(agent)},
        )
        db.session.add(chat)
        db.session.flush()
        last_visitor_message = None
        for offset, (sender, text) in enumerate(lines):
            message = Message(
                tenant_id=tenant.id,
                chat_id=chat.id,
                sender=sender,
                content=text,
                created_at=started + timedelta(minutes=offset),
                # A demo answer names the question it answers, as a real reply does: without
                # it the question looks unanswered and the assistant answers it again.
                in_response_to_id=(
                    last_visitor_message.id
                    if sender == "assistant" and last_visitor_message
                    else None
                ),
            )
            db.session.add(message)
            db.session.flush()
            if sender == "visitor":
                last_visitor_message = message
        result.created.append(f"chat {title!r}")

    shure = _manufacturer("shure", "Shure")
    location = db.session.scalar(
        select(Location).where(Location.tenant_id == tenant.id, Location.name == "Main stage")
    )
    if location is None:
        location = Location(tenant_id=tenant.id, name="Main stage", alert_on_offline=True)
        db.session.add(location)
        db.session.flush()
        result.created.append("location")
    known = set(
        db.session.scalars(select(Device.api_device_id).where(Device.tenant_id == tenant.id))
    )
    for api_id, model in DEMO_RECEIVERS:
        if api_id in known:
            continue
        db.session.add(
            Device(
                tenant_id=tenant.id,
                manufacturer_id=shure.id,
                api_device_id=api_id,
                kind="receiver",
                name=api_id,
                model=model,
                location_id=location.id,
            )
        )
        result.created.append(f"device {api_id!r}")

    project = db.session.scalar(
        select(Project).where(Project.tenant_id == tenant.id, Project.name == "Starter API")
    )
    if project is None:
        project = Project(
            tenant_id=tenant.id,
            name="Starter API",
            description="A small Flask service generated as a demo.",
        )
        db.session.add(project)
        db.session.flush()
        files = {
            "README.md": "# Starter API\n\nRun `flask run`.\n",
            "app.py": "from flask import Flask\n\napp = Flask(__name__)\n\n\n"
            "@app.get('/')\ndef index():\n    return {'ok': True}\n",
        }
        # Through the real lifecycle, so the demo's events and totals are the real ones.
        generation = projects.start_generation(project, "A minimal Flask API with one endpoint")
        projects.transition(generation.id, "generating")
        for path, content in files.items():
            projects.add_file(generation, path, content)
        projects.transition(generation.id, "completed")
        result.created.append("project")
    if _add_metric_history(tenant.id):
        result.created.append(f"{DEMO_HISTORY_DAYS} days of metrics")
    db.session.flush()
    return result


def _add_metric_history(tenant_id: int) -> bool:
    """Daily counts for the days before today (the same every time: seeded), once: the real
    events of the demo's own records count into today as they happen."""
    from models.metrics import MetricCounter

    today = metrics.today()
    first = today - timedelta(days=DEMO_HISTORY_DAYS)
    loaded = db.session.scalar(
        select(MetricCounter.id)
        .where(
            MetricCounter.tenant_id == tenant_id,
            MetricCounter.name == metrics.CHATS_CREATED,
            MetricCounter.day >= first,
            MetricCounter.day < today,
        )
        .limit(1)
    )
    if loaded is not None:
        return False
    rng = random.Random(DEMO_HISTORY_SEED)
    counts: list[metrics.Count] = []
    for days_ago in range(DEMO_HISTORY_DAYS, 0, -1):
        day = today - timedelta(days=days_ago)
        busy = day.weekday() < 5
        chats = rng.randint(4, 12) if busy else rng.randint(1, 5)
        visitor = chats * rng.randint(2, 4)
        assistant = visitor + rng.randint(0, chats)
        counts += [
            (metrics.CHATS_CREATED, tenant_id, day, {"agent_id": "demo"}, chats),
            (metrics.MESSAGES_CREATED, tenant_id, day, {"sender": "visitor"}, visitor),
            (metrics.MESSAGES_CREATED, tenant_id, day, {"sender": "assistant"}, assistant),
            (metrics.DEVICE_EVENTS, tenant_id, day, {"type": "online"}, rng.randint(0, 3)),
            (metrics.DEVICE_EVENTS, tenant_id, day, {"type": "offline"}, rng.randint(0, 2)),
        ]
        completed, failed = rng.choice((0, 0, 1, 2)), rng.choice((0, 0, 0, 1))
        if completed:
            counts.append(
                (metrics.PROJECT_GENERATIONS, tenant_id, day, {"outcome": "completed"}, completed)
            )
        if failed:
            counts.append(
                (metrics.PROJECT_GENERATIONS, tenant_id, day, {"outcome": "failed"}, failed)
            )
    metrics.add_counts(counts)
    return True
