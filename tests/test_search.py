"""Global search (/search): what a signed-in user finds, never another tenant's records, on
SQLite (LIKE) and on PostgreSQL (full-text search)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from tests.conftest import Factory, login


@dataclass
class Seeded:
    user: object
    ids: dict[str, int]


def _seed(app) -> Seeded:
    """Two tenants; "Falcon" names something of every kind in both."""
    from extensions import db
    from models.chats import Chat, Message
    from models.devices import Device, Manufacturer
    from models.projects import Project

    factory = Factory(app)
    mine, theirs = factory.tenant("Mine"), factory.tenant("Theirs")
    user = factory.user(mine)
    ids: dict[str, int] = {}
    with app.app_context():
        maker = Manufacturer(code="shure", name="Shure")
        db.session.add(maker)
        db.session.flush()

        def device(tenant, key, name, model="", ip=None):
            row = Device(
                tenant_id=tenant.id,
                manufacturer_id=maker.id,
                api_device_id=key,
                name=name,
                model=model,
                ip_address=ip,
                state={},
            )
            db.session.add(row)
            db.session.flush()
            ids[key] = row.id

        device(mine, "falcon", "Falcon stage left", "ULXD4Q", "10.20.30.41")
        device(mine, "percent", "Gain 100% Mic")
        device(mine, "plain", "Gain 1000 Mic")
        device(mine, "underscore", "rack_a")
        device(mine, "notunderscore", "rackxa")
        device(theirs, "their-falcon", "Falcon of theirs", "ULXD4Q", "10.20.30.42")

        def chat(tenant, key, visitor, said, title=""):
            row = Chat(tenant_id=tenant.id, visitor_id=visitor, title=title)
            db.session.add(row)
            db.session.flush()
            db.session.add(
                Message(tenant_id=tenant.id, chat_id=row.id, content=said, sender="visitor")
            )
            db.session.flush()
            ids[key] = row.id

        chat(mine, "chat-refund", "visitor-7f3a", "I would like a refund for the headset")
        chat(mine, "chat-falcon", "visitor-0001", "Is the Falcon receiver in stock?")
        chat(theirs, "their-chat", "visitor-7f3b", "Falcon refund please")

        def project(tenant, key, name):
            row = Project(tenant_id=tenant.id, name=name)
            db.session.add(row)
            db.session.flush()
            ids[key] = row.id

        project(mine, "project-falcon", "Falcon tour 2027")
        project(theirs, "their-project", "Falcon secret plans")
        db.session.commit()
    return Seeded(user=user, ids=ids)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def site(request):
    app = request.getfixturevalue("app" if request.param == "sqlite" else "prod_app")
    seeded = _seed(app)
    client = login(app.test_client(), seeded.user)
    return app, client, seeded.ids


def _links(html: str) -> set[str]:
    return set(re.findall(r'href="(/(?:devices|chats|projects)/\d+)"', html))


def _search(client, **args):
    response = client.get("/search", query_string=args)
    assert response.status_code == 200, response.data[:400]
    return response.get_data(as_text=True)


def test_finds_devices_by_name_model_and_ip(site):
    _, client, ids = site
    falcon = f"/devices/{ids['falcon']}"
    assert falcon in _links(_search(client, q="falcon"))
    assert falcon in _links(_search(client, q="ULXD4Q"))
    assert falcon in _links(_search(client, q="10.20.30.41"))
    assert falcon in _links(_search(client, q="10.20.30"))
    assert falcon not in _links(_search(client, q="refund"))


def test_finds_chats_by_visitor_and_by_what_was_said(site):
    _, client, ids = site
    refund = f"/chats/{ids['chat-refund']}"
    assert refund in _links(_search(client, q="visitor-7f3a"))
    assert refund in _links(_search(client, q="refund headset"))
    assert f"/chats/{ids['chat-falcon']}" in _links(_search(client, q="falcon"))


def test_finds_projects_by_name(site):
    _, client, ids = site
    assert f"/projects/{ids['project-falcon']}" in _links(_search(client, q="Falcon tour"))


def test_another_tenants_records_never_appear(site):
    _, client, ids = site
    theirs = {
        f"/devices/{ids['their-falcon']}",
        f"/chats/{ids['their-chat']}",
        f"/projects/{ids['their-project']}",
    }
    for query in ("falcon", "refund", "visitor-7f3", "10.20.30.42", "secret plans"):
        for kind in ("", "devices", "chats", "projects"):
            html = _search(client, q=query, kind=kind)
            assert not theirs & _links(html), (query, kind)
            assert "Falcon of theirs" not in html and "Falcon secret" not in html


def test_percent_and_underscore_match_literally(site):
    _, client, ids = site
    found = _links(_search(client, q="100%", kind="devices"))
    assert f"/devices/{ids['percent']}" in found
    assert f"/devices/{ids['plain']}" not in found
    found = _links(_search(client, q="rack_a", kind="devices"))
    assert f"/devices/{ids['underscore']}" in found
    assert f"/devices/{ids['notunderscore']}" not in found
    # A lone wildcard is not "everything": at most the one name that holds it.
    assert _links(_search(client, q="%")) <= {f"/devices/{ids['percent']}"}
    assert _links(_search(client, q="_")) <= {f"/devices/{ids['underscore']}"}


def test_empty_query_is_a_friendly_empty_state(site):
    _, client, _ = site
    for query in ("", "   "):
        html = _search(client, q=query)
        assert "Type a device name" in html
        assert not _links(html.split("<main")[1])
    html = _search(client, q="no such thing anywhere")
    assert "Nothing matches" in html


def test_results_are_keyset_paged_by_kind(site):
    from extensions import db
    from models.devices import Device

    app, client, _ = site
    with app.app_context():
        first = db.session.get(Device, 1) or db.session.scalars(db.select(Device)).first()
        for n in range(30):
            db.session.add(
                Device(
                    tenant_id=first.tenant_id,
                    manufacturer_id=first.manufacturer_id,
                    api_device_id=f"page-{n}",
                    name=f"Pager unit {n}",
                    state={},
                )
            )
        db.session.commit()
        page_size = app.config["LIST_PAGE_SIZE"]
    # The overview shows a few of each kind and links to the kind's own list.
    overview = _search(client, q="pager")
    assert 0 < len(_links(overview)) < 30
    assert "kind=devices" in overview
    seen: list[str] = []
    html = _search(client, q="pager", kind="devices")
    while True:
        page = [href for href in re.findall(r'href="(/devices/\d+)"', html)]
        assert len(page) <= page_size
        seen += page
        older = re.search(r'href="(/search\?[^"]*before=\d+[^"]*)"', html)
        if not older:
            break
        html = client.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert len(seen) == len(set(seen)) == 30
    ids = [int(href.rsplit("/", 1)[1]) for href in seen]
    assert ids == sorted(ids, reverse=True)


@pytest.mark.parametrize(
    "args",
    [
        {"q": "falcon", "before": "abc"},
        {"q": "falcon", "kind": "devices", "before": "-1"},
        {"q": "falcon", "kind": "devices", "before": str(2**31)},
        {"q": "", "before": "1e9"},
        {"q": "falcon", "kind": "users"},
    ],
)
def test_bad_arguments_are_a_400_that_says_why(site, args):
    _, client, _ = site
    response = client.get("/search", query_string=args)
    assert response.status_code == 400
    assert "must be" in response.get_data(as_text=True)


def test_hostile_queries_never_fail(site):
    _, client, _ = site
    for query in ("\x00falcon", "a" * 5000, "falcon' OR 1=1 --", "!!&|:*()<->", "\\", "é" * 300):
        response = client.get("/search", query_string={"q": query})
        assert response.status_code == 200, (query[:20], response.status_code)


def test_htmx_request_gets_only_the_results(site):
    _, client, ids = site
    response = client.get("/search?q=falcon", headers={"HX-Request": "true"})
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<html" not in html and 'role="search"' not in html
    assert f"/devices/{ids['falcon']}" in _links(html)
    assert "HX-Request" in response.headers.get("Vary", "")
    full = client.get("/search?q=falcon")
    assert "<html" in full.get_data(as_text=True)
    assert "HX-Request" in full.headers.get("Vary", "")


def test_every_page_has_a_search_form_that_works_without_javascript(site):
    _, client, _ = site
    html = client.get("/devices/").get_data(as_text=True)
    form = re.search(r'<form class="site-search"[^>]*>', html)
    assert form and 'method="get"' in form.group(0) and 'action="/search"' in form.group(0)
    assert 'name="q"' in html.split(form.group(0))[1].split("</form>")[0]


def test_search_needs_a_login(app):
    response = app.test_client().get("/search?q=falcon")
    assert response.status_code in (302, 303)
    assert "/login" in response.headers["Location"]
