"""Pages over a big fleet (issue 7): the devices dashboard and the activity page with 100,000
devices and 5,000,000 activity rows in PostgreSQL.

The data is generated in SQL (generate_series) into a throwaway database migrated the
production way (`flask db upgrade`, so the indexes are the migrations' own), then ANALYZEd.
Each page is requested through the Flask app in this process (a logged-in test client: the
view, its queries and the template, without a network hop; the heap settled as in a server
process, app.settle_heap) as a full page and as its htmx
partial. The deep activity page is the keyset page `?before=<id>` some millions of rows down;
next to it, in the same run, the same 50 rows fetched the OFFSET way and the keyset way as
bare SQL, so the ratio shows what keyset pagination saves at that depth.
"""

from __future__ import annotations

import argparse
import re
import time

from bench.common import create_tenant_user, note, prod_app, result, sized, summarize

NAME = "pages"
DESCRIPTION = "dashboard and activity pages with 100k devices and 5M activity rows"

DEFAULTS = {"devices": (100_000, 10_000), "activity": (5_000_000, 300_000), "samples": (60, 20)}
LOCATIONS = 40
TYPES = ("status", "update", "discovery", "sync")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pages")
    group.add_argument("--pages-devices", type=int, help="devices (default 100000; quick 10000)")
    group.add_argument(
        "--pages-activity", type=int, help="activity rows (default 5000000; quick 300000)"
    )
    group.add_argument("--pages-samples", type=int, help="requests per figure (60; quick 20)")


def _size(args: argparse.Namespace, name: str):
    return sized(args, name, DEFAULTS, NAME)


def _fill(conn, tenant_id: int, devices: int, activity: int) -> None:
    from sqlalchemy import text

    from extensions import db
    from models.devices import Location, Manufacturer

    maker = Manufacturer(code="benchco", name="Bench Co")
    db.session.add(maker)
    db.session.add_all(
        Location(tenant_id=tenant_id, name=f"Hall {n:02d}", alert_on_offline=True)
        for n in range(1, LOCATIONS + 1)
    )
    db.session.commit()
    maker = maker.id
    conn.execute(
        text(
            "INSERT INTO devices (tenant_id, manufacturer_id, api_device_id, kind, name, model,"
            " firmware, location_id, is_online, last_seen, missed_polls, maintenance_mode, state,"
            " created_at, updated_at)"
            " SELECT :t, :m, 'BENCH-' || g, CASE WHEN g % 3 = 0 THEN 'receiver'"
            " ELSE 'transmitter' END, 'Mic ' || g, 'ULXD4D', '2.5.4',"
            " (SELECT min(id) FROM locations WHERE tenant_id = :t) + (g % :locs),"
            " g % 10 <> 0, now(), 0, false,"
            " json_build_object('battery_bars', g % 6, 'battery_minutes', (g * 7) % 600,"
            "   'rf_level', (g * 13) % 100, 'audio_level', (g * 17) % 100),"
            " now(), now()"
            " FROM generate_series(1, :n) g"
        ),
        {"t": tenant_id, "m": maker, "n": devices, "locs": LOCATIONS},
    )
    first_device = conn.execute(
        text("SELECT min(id) FROM devices WHERE tenant_id = :t"), {"t": tenant_id}
    ).scalar()
    batch = 1_000_000
    for start in range(0, activity, batch):
        stop = min(activity, start + batch)
        conn.execute(
            text(
                "INSERT INTO activity_logs (tenant_id, device_id, activity_type, operation,"
                " status, summary, details, service_code, created_at)"
                " SELECT :t, :d + (g % :nd), (ARRAY['status','update','discovery','sync'])"
                "[1 + g % 4], 'poll', CASE WHEN g % 50 = 0 THEN 'error' WHEN g % 7 = 0"
                " THEN 'warning' ELSE 'success' END, 'Mic ' || (g % :nd) || ' changed',"
                " '{}'::json, 'benchco', now() - make_interval(secs => (:total - g) * 0.5)"
                " FROM generate_series(:a, :b) g"
            ),
            {"t": tenant_id, "d": first_device, "nd": devices, "a": start + 1, "b": stop,
             "total": activity},
        )  # fmt: skip
        note(f"activity rows: {stop:,} of {activity:,}")
    conn.execute(text("ANALYZE"))


def _time(fn, samples: int) -> list[float]:
    fn()  # warm: templates compiled, plans cached
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    from sqlalchemy import text

    devices, activity, samples = (_size(args, n) for n in ("devices", "activity", "samples"))
    rows: list[dict] = []
    with prod_app("pages", schema="migrate") as penv:
        app = penv.app
        user = create_tenant_user(penv)
        from extensions import db

        started = time.perf_counter()
        with app.app_context():
            with db.engine.begin() as conn:
                _fill(conn, user.tenant_id, devices, activity)
        note(f"generated {devices:,} devices and {activity:,} activity rows in "
             f"{time.perf_counter() - started:.0f}s")  # fmt: skip

        client = app.test_client()
        page = client.get("/login")
        token = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data)
        login = client.post(
            "/login",
            data={"email": user.email, "password": user.password, "csrf_token": token.group(1)},
        )
        assert login.status_code == 303, login.status_code
        # As wsgi.py does in every server process once the app is built.
        from app import settle_heap

        settle_heap()

        with app.app_context():
            top = db.session.execute(
                text("SELECT max(id) FROM activity_logs WHERE tenant_id = :t"),
                {"t": user.tenant_id},
            ).scalar()
        depth = activity * 3 // 5  # 60 % of the way down
        deep_before = top - depth + 1  # ids are dense: `depth` rows are newer than the page

        def get(path: str, partial: bool = False):
            headers = {"HX-Request": "true"} if partial else {}
            response = client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.status_code)
            return response

        figures = [
            ("dashboard page", "/devices/", False),
            ("dashboard partial", "/devices/", True),
            ("dashboard, one location", "/devices/?location=__LOC__", True),
            ("activity page", "/devices/activity", False),
            ("activity partial", "/devices/activity", True),
            ("activity, type filter", "/devices/activity?type=sync", True),
            ("activity, error filter", "/devices/activity?status=error", True),
            (f"activity, keyset {depth:,} deep", f"/devices/activity?before={deep_before}", True),
            ("API activity-logs page", "/api/v2/activity-logs/", False),
        ]
        with app.app_context():
            location = db.session.execute(
                text("SELECT min(id) FROM locations WHERE tenant_id = :t"), {"t": user.tenant_id}
            ).scalar()
        for figure, path, partial in figures:
            path = path.replace("__LOC__", str(location))
            stats = summarize(_time(lambda p=path, h=partial: get(p, h), samples))
            size = len(get(path, partial).data)
            rows.append(
                result(f"{figure} p50", stats["p50"], "ms", detail=f"GET {path} ({size:,} bytes)")
            )
            rows.append(
                result(
                    f"{figure} p99",
                    stats["p99"],
                    "ms",
                    detail=f"{samples} requests; max {stats['max']:.1f} ms; target < 50 ms",
                )
            )

        # The same deep page as bare SQL, keyset vs OFFSET, side by side.
        keyset_sql = text(
            "SELECT * FROM activity_logs WHERE tenant_id = :t AND id < :before"
            " ORDER BY id DESC LIMIT 50"
        )
        offset_sql = text(
            "SELECT * FROM activity_logs WHERE tenant_id = :t ORDER BY id DESC"
            " OFFSET :skip LIMIT 50"
        )
        with app.app_context():
            with db.engine.connect() as conn:
                keyset_rows = conn.execute(
                    keyset_sql, {"t": user.tenant_id, "before": deep_before}
                ).all()
                offset_rows = conn.execute(offset_sql, {"t": user.tenant_id, "skip": depth}).all()
                same = [r.id for r in keyset_rows] == [r.id for r in offset_rows]
                keyset = summarize(
                    _time(
                        lambda: conn.execute(
                            keyset_sql, {"t": user.tenant_id, "before": deep_before}
                        ).all(),
                        samples,
                    )
                )
                offset = summarize(
                    _time(
                        lambda: conn.execute(
                            offset_sql, {"t": user.tenant_id, "skip": depth}
                        ).all(),
                        max(5, samples // 4),
                    )
                )
        detail = f"the page {depth:,} rows down; same 50 rows both ways: {same}"
        rows.append(result("deep page SQL, keyset p50", keyset["p50"], "ms", detail=detail))
        rows.append(result("deep page SQL, keyset p99", keyset["p99"], "ms"))
        rows.append(
            result(
                "deep page SQL, OFFSET p50",
                offset["p50"],
                "ms",
                ratio=offset["p50"] / keyset["p50"] if keyset["p50"] else None,
                vs="keyset p50",
                detail="ORDER BY id DESC OFFSET n LIMIT 50",
            )
        )
        rows.append(
            result(
                "deep page SQL, OFFSET p99",
                offset["p99"],
                "ms",
                ratio=offset["p99"] / keyset["p99"] if keyset["p99"] else None,
                vs="keyset p99",
            )
        )
    return rows
