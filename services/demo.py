"""Demo data for `flask demo load` (idempotent: running it twice adds nothing)."""

from __future__ import annotations

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
from services import projects
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
        for offset, (sender, text) in enumerate(lines):
            db.session.add(
                Message(
                    tenant_id=tenant.id,
                    chat_id=chat.id,
                    sender=sender,
                    content=text,
                    created_at=started + timedelta(minutes=offset),
                )
            )
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
    db.session.flush()
    return result
