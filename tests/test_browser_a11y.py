"""In Chromium: every console page on a laptop and on a phone, light and dark, checked by axe.

One app with the demo data, one live server, one browser; the pages are visited in a loop.
axe-core is vendored under static/vendor and injected from the app's own origin, so the
console's strict Content-Security-Policy is the one in force while it runs.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from sqlalchemy import select

from tests.browser import chromium
from tests.conftest import LiveServer, drain, make_app

pytestmark = pytest.mark.browser

LAPTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE_URL = "/static/vendor/axe-core/axe-4.14.1.min.js"

# axe runs every default rule; these are the ones the console must pass whatever their impact
# (besides every serious or critical one): a named nav, an h1 per page, content in landmarks.
ALWAYS_FAILING_RULES = {"landmark-unique", "page-has-heading-one", "region", "bypass"}

RUN_AXE = """async (only) => {
  const options = {resultTypes: ["violations"]};
  if (only) options.runOnly = {type: "rule", values: only};
  const result = await axe.run(document, options);
  return result.violations.map(v => ({
    id: v.id, impact: v.impact, count: v.nodes.length,
    targets: v.nodes.slice(0, 3).map(n => n.target.join(" ") + " :: " + n.failureSummary),
  }));
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The demo tenant with one of everything a page lists, served over real HTTP."""
    from extensions import db
    from models.accounts import User
    from models.chats import Chat
    from models.devices import Device
    from models.notifications import Notification
    from models.projects import GeneratedProject, Project, ProjectFile
    from models.webhooks import WebhookDelivery, WebhookEndpoint
    from services.demo import load_demo

    app = make_app(tmp_path_factory.mktemp("a11y"))
    with app.app_context():
        db.create_all()
    state = app.extensions["switchboard.tasks"]
    state.start_embedded_worker()
    with app.app_context():
        demo = load_demo()
        db.session.commit()
        admin = db.session.scalar(select(User).where(User.email == demo.email))
        endpoint = WebhookEndpoint(
            tenant_id=admin.tenant_id,
            url="https://hooks.example.com/switchboard/a-rather-long-path/for/the/receiver",
            # No event matches, so nothing is sent anywhere; its deliveries are made up below.
            topics=["test.nothing"],
        )
        db.session.add(endpoint)
        db.session.flush()
        for attempt, (status, error) in enumerate(
            [(200, None), (None, "Connection refused while connecting to the receiver")], 1
        ):
            db.session.add(
                WebhookDelivery(
                    tenant_id=admin.tenant_id,
                    endpoint_id=endpoint.id,
                    event_pk=attempt,
                    event_id=uuid.uuid4(),
                    topic="device_record.updated",
                    webhook_id=f"msg_{uuid.uuid4().hex}",
                    attempt=attempt,
                    status_code=status,
                    latency_ms=42,
                    error=error,
                    succeeded=status == 200,
                )
            )
        db.session.add(
            Notification(
                tenant_id=admin.tenant_id,
                recipient_id=admin.id,
                type="device.offline",
                title="STAGE-LEFT went offline",
                body="The receiver on Main stage stopped answering.",
                link="/devices/",
            )
        )
        db.session.commit()
        chat_id = db.session.scalar(select(Chat.id).order_by(Chat.id))
        device_id = db.session.scalar(select(Device.id).order_by(Device.id))
        project_id = db.session.scalar(select(Project.id).order_by(Project.id))
        file_id = db.session.scalar(select(ProjectFile.id).order_by(ProjectFile.id))
        generation_id = db.session.scalar(select(GeneratedProject.id))
        endpoint_id = endpoint.id
    drain(app)
    pages = {
        "dashboard": "/",
        "chats": "/chats/",
        "chat": f"/chats/{chat_id}",
        "agents": "/chats/agents",
        "new agent": "/chats/agents/new",
        "escalation phrases": "/chats/escalation",
        "widget settings": "/chats/settings",
        "canned replies": "/chats/canned",
        "search": "/search?q=stage",
        "devices": "/devices/",
        "device": f"/devices/{device_id}",
        "device activity": "/devices/activity",
        "device settings": "/devices/settings",
        "projects": "/projects/",
        "project": f"/projects/{project_id}",
        "generation": f"/projects/generations/{generation_id}",
        "project file": f"/projects/files/{file_id}",
        "notifications": "/notifications/",
        "notification preferences": "/notifications/preferences",
        "webhooks": "/webhooks/",
        "webhook endpoint": f"/webhooks/{endpoint_id}",
        "metrics": "/metrics/dashboard",
        "audit": "/audit/",
        "account": "/account",
    }
    server = LiveServer(app).start()
    try:
        with chromium() as browser:
            yield {
                "app": app,
                "url": server.url,
                "browser": browser,
                "email": demo.email,
                "password": demo.password,
                "pages": pages,
            }
    finally:
        server.stop()
        state.stop()
        with app.app_context():
            db.engine.dispose()


def signed_in_context(site, viewport, color_scheme="light"):
    context = site["browser"].new_context(viewport=viewport, color_scheme=color_scheme)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(site["url"] + "/login")
    page.fill("input[name=email]", site["email"])
    page.fill("input[name=password]", site["password"])
    page.click("button[type=submit]")
    page.wait_for_url(site["url"] + "/")
    return context, page


def axe_violations(page, base_url: str, only: list[str] | None = None) -> list[dict]:
    page.add_script_tag(url=base_url + AXE_URL)
    return page.evaluate(RUN_AXE, only)


def blocking(violations: list[dict]) -> list[dict]:
    return [
        v
        for v in violations
        if v["impact"] in ("serious", "critical") or v["id"] in ALWAYS_FAILING_RULES
    ]


def visit_every_page(site, page, check) -> dict[str, list]:
    """Run `check(name, page)` on every page (signed in), plus the error page."""
    problems: dict[str, list] = {}
    for name, path in site["pages"].items():
        response = page.goto(site["url"] + path)
        assert response is not None and response.status == 200, (name, path)
        found = check(name, page)
        if found:
            problems[name] = found
    response = page.goto(site["url"] + "/devices/987654321")
    assert response is not None and response.status == 404
    found = check("error page", page)
    if found:
        problems["error page"] = found
    return problems


def too_wide(page) -> list[str]:
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    return (
        [f"page is {width[0]} px wide in a {width[1]} px viewport"] if width[0] > width[1] else []
    )


def format_problems(problems: dict[str, list]) -> str:
    return "\n".join(f"{name}: {line}" for name, lines in problems.items() for line in lines)


def report(counts: Counter, label: str) -> None:
    # Shown with -s: what axe found, per rule (impact), over every page of this run.
    print(
        f"\naxe {label}: " + (", ".join(f"{k}={n}" for k, n in sorted(counts.items())) or "clean")
    )


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_every_page_fits_the_screen_and_axe_finds_nothing_serious(site, viewport):
    context, page = signed_in_context(site, viewport)
    counts: Counter = Counter()

    def check(name, page):
        found = too_wide(page)
        violations = axe_violations(page, site["url"])
        for v in violations:
            counts[f"{v['id']} ({v['impact']})"] += v["count"]
        found += [f"{v['id']} ({v['impact']}): {v['targets']}" for v in blocking(violations)]
        return found

    try:
        problems = visit_every_page(site, page, check)
    finally:
        context.close()
    context = site["browser"].new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.goto(site["url"] + "/login")
        found = check("login", page)
        if found:
            problems["login"] = found
    finally:
        context.close()
    report(counts, f"{viewport['width']}x{viewport['height']}")
    assert problems == {}, format_problems(problems)


def relative_luminance(rgb: str) -> float:
    parts = [int(float(p)) for p in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]

    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in parts)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_dark_mode_follows_the_system_setting_and_keeps_contrast(site):
    context, page = signed_in_context(site, PHONE, color_scheme="dark")
    counts: Counter = Counter()

    def check(name, page):
        found = []
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        if relative_luminance(background) > 0.05:
            found.append(f"light background {background}")
        card_backgrounds = page.evaluate(
            "[...document.querySelectorAll('.card, table.list, .feed-list, .device-card, .msg')]"
            ".map(e => getComputedStyle(e).backgroundColor)"
        )
        found += [f"light box {c}" for c in set(card_backgrounds) if relative_luminance(c) > 0.2]
        # The light runs check everything else; what the theme changes is colour.
        violations = axe_violations(
            page, site["url"], only=["color-contrast", "link-in-text-block"]
        )
        for v in violations:
            counts[f"{v['id']} ({v['impact']})"] += v["count"]
        found += [f"{v['id']} ({v['impact']}): {v['targets']}" for v in blocking(violations)]
        return found

    try:
        problems = visit_every_page(site, page, check)
    finally:
        context.close()
    report(counts, "dark 390x844")
    assert problems == {}, format_problems(problems)


def test_on_a_phone_the_nav_collapses_and_bell_account_and_sign_out_are_reachable(site):
    context, page = signed_in_context(site, PHONE)
    try:
        page.goto(site["url"] + "/chats/")
        nav_link = page.get_by_role("link", name="Devices", exact=True)
        # Collapsed: the links take no room until the menu is opened.
        assert not nav_link.is_visible()
        page.get_by_text("Menu", exact=True).click()
        for target in (
            nav_link,
            page.get_by_role("link", name="Notifications", exact=True).first,
            page.locator("header .bell"),
            page.get_by_role("link", name=site["email"]),
            page.get_by_role("button", name="Sign out"),
        ):
            target.scroll_into_view_if_needed()
            assert target.is_visible()
            box = target.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        nav_link.click()
        page.wait_for_url(site["url"] + "/devices/")
        # The first Tab reaches the skip link, which moves focus past the header.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "content"
    finally:
        context.close()
    # The laptop shows the whole nav at once, with no menu button.
    context, page = signed_in_context(site, LAPTOP)
    try:
        assert page.get_by_role("link", name="Devices", exact=True).is_visible()
        assert not page.get_by_text("Menu", exact=True).is_visible()
    finally:
        context.close()


def test_inputs_share_one_style_and_change_agent_stays_beside_its_select(site):
    context, page = signed_in_context(site, PHONE)
    try:
        page.goto(site["url"] + "/chats/")
        text_style = page.evaluate(
            "(() => { const i = document.createElement('input'); i.type = 'text';"
            " document.querySelector('main').append(i); const s = getComputedStyle(i);"
            " const r = [s.borderRadius, s.borderTopColor, s.paddingTop]; i.remove(); return r })()"
        )
        styles = {}
        for path, selector in [
            ("/chats/", "input[type=search]"),
            ("/chats/", "input[type=date]"),
            ("/webhooks/", "input[type=url]"),
            ("/devices/settings", "input[type=number]"),
        ]:
            page.goto(site["url"] + path)
            field = page.locator(selector).first
            styles[selector] = field.evaluate(
                "e => { const s = getComputedStyle(e);"
                " return [s.borderRadius, s.borderTopColor, s.paddingTop] }"
            )
        assert styles == dict.fromkeys(styles, text_style)

        page.goto(site["url"] + site["pages"]["chat"])
        button = page.get_by_role("button", name="Change agent")
        select_box = button.locator("xpath=..").locator("select").bounding_box()
        button_box = button.bounding_box()
        assert select_box is not None and button_box is not None
        # Side by side: the button starts right of the select, on the same line.
        assert button_box["x"] >= select_box["x"] + select_box["width"] - 1
        assert abs(button_box["y"] - select_box["y"]) < select_box["height"]
    finally:
        context.close()


def test_first_load_has_a_favicon_and_no_console_errors(site):
    context = site["browser"].new_context(viewport=LAPTOP)
    page = context.new_page()
    errors: list[str] = []
    missing: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
    try:
        page.goto(site["url"] + "/login")
        page.fill("input[name=email]", site["email"])
        page.fill("input[name=password]", site["password"])
        page.click("button[type=submit]")
        page.wait_for_url(site["url"] + "/")
        page.wait_for_load_state("networkidle")
        icon = page.evaluate(
            "(() => { const l = document.querySelector('link[rel~=icon]'); return l && l.href })()"
        )
        assert icon, "no <link rel=icon>"
        assert page.request.get(icon).status == 200
    finally:
        context.close()
    assert errors == [] and missing == []
