"""Playwright driving Debian's Chromium (never a downloaded browser)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import expect

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

# Assertions wait as long as page actions do: a loaded CI machine is slower than a laptop.
expect.set_options(timeout=15_000)


def chromium_path() -> str:
    path = os.environ.get("SWITCHBOARD_CHROMIUM") or shutil.which("chromium") or ""
    if not path or not os.path.exists(path):
        message = "chromium not installed (scripts/ensure-services installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextmanager
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def login_page(browser, base_url: str, email: str, password: str):
    page = browser.new_context().new_page()
    page.set_default_timeout(15_000)
    page.goto(base_url + "/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(base_url + "/")
    return page


WIDGET = "#switchboard-chat "
PHONE = {"width": 390, "height": 844}


def widget_page(browser, site: str, *, phone: bool = False):
    """A visitor's page of the embedding site at `site`, the chat widget opened (at a
    phone's width when `phone`)."""
    context = browser.new_context(viewport=PHONE) if phone else browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(site + "/")
    page.locator(WIDGET + ".launcher").click()
    return page


def say(page, text: str) -> None:
    """The visitor types `text` into the widget and sends it with Enter."""
    box = page.locator(WIDGET + "textarea")
    box.fill(text)
    box.press("Enter")
