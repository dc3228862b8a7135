"""In Chromium: the search box and the keyboard shortcuts of every console page, and the
search page checked by axe on a laptop and a phone."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser import chromium, login_page
from tests.conftest import PASSWORD
from tests.test_browser_a11y import LAPTOP, PHONE, axe_violations, blocking, too_wide
from tests.test_search import _seed

pytestmark = pytest.mark.browser


@pytest.fixture
def seeded(app, live_server):
    return live_server.url, _seed(app)


def _focused_id(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.id")


def test_shortcuts_move_around_the_console(seeded):
    url, data = seeded
    with chromium() as browser:
        page = login_page(browser, url, data.user.email, PASSWORD)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/devices/")

        # "/" focuses the search box and is not typed into it.
        page.keyboard.press("/")
        assert _focused_id(page) == "site-search-q"
        expect(page.locator("#site-search-q")).to_have_value("")
        # While typing, letters are letters: no navigation, no dialog.
        page.keyboard.type("gc?jk")
        expect(page.locator("#site-search-q")).to_have_value("gc?jk")
        assert page.url == url + "/devices/"
        expect(page.locator("#shortcuts-help")).to_be_hidden()

        # Ctrl-K focuses it from anywhere else.
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("Control+k")
        assert _focused_id(page) == "site-search-q"
        page.evaluate("document.activeElement.blur()")

        # "?" lists the shortcuts; Escape closes the list.
        page.keyboard.press("?")
        help_dialog = page.locator("#shortcuts-help")
        expect(help_dialog).to_be_visible()
        expect(help_dialog).to_contain_text("Go to chats")
        expect(help_dialog).to_contain_text("Next / previous item")
        page.keyboard.press("Escape")
        expect(help_dialog).to_be_hidden()

        # g then c / d / p go to chats, devices, projects.
        for letter, path in (("c", "/chats/"), ("p", "/projects/"), ("d", "/devices/")):
            page.keyboard.press("g")
            page.keyboard.press(letter)
            page.wait_for_url(url + path)

        # The header form searches with Enter; j/k walk the results and Enter opens one.
        page.keyboard.press("/")
        page.keyboard.type("falcon")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r".*/search\?q=falcon$"))
        items = page.locator("[data-nav-item]")
        expect(items).to_have_count(3)
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("j")
        page.keyboard.press("j")
        page.keyboard.press("k")
        expect(items.nth(0)).to_have_class(re.compile(r"\bis-selected\b"))
        expect(page.locator(".is-selected")).to_have_count(1)
        page.keyboard.press("j")
        expect(items.nth(1)).to_have_class(re.compile(r"\bis-selected\b"))
        target = items.nth(1).locator("a").get_attribute("href")
        page.keyboard.press("Enter")
        page.wait_for_url(url + target)
        assert errors == []


def test_search_page_form_swaps_only_the_results(seeded):
    url, data = seeded
    with chromium() as browser:
        page = login_page(browser, url, data.user.email, PASSWORD)
        page.goto(url + "/search")
        expect(page.locator("#search-results")).to_contain_text("Type a device name")
        loads: list[str] = []
        page.on("load", lambda _: loads.append(page.url))
        page.fill("#search-page-q", "refund headset")
        page.press("#search-page-q", "Enter")
        expect(page.locator("#search-results")).to_contain_text("visitor-7f3a")
        # The address follows the results (so the page can be shared and reloaded).
        page.wait_for_url(re.compile(r".*q=refund\+headset.*"))
        assert loads == []


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_search_page_and_shortcuts_dialog_pass_axe(seeded, viewport):
    url, data = seeded
    with chromium() as browser:
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        page.goto(url + "/login")
        page.fill("input[name=email]", data.user.email)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/")
        for path in ("/search", "/search?q=falcon", "/search?q=nothing-like-this"):
            page.goto(url + path)
            assert not too_wide(page), (path, too_wide(page))
            assert not blocking(axe_violations(page, url)), path
        page.keyboard.press("?")
        expect(page.locator("#shortcuts-help")).to_be_visible()
        assert not blocking(axe_violations(page, url)), "shortcuts dialog"
        context.close()
