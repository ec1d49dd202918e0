"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright.

``require_browser(what)`` skips (or in CI fails) the calling module when
Playwright or Debian's chromium is missing, naming the tests in ``what``; the
``browser`` fixture launches one Chromium per module, and ``new_page`` opens a page
in a fresh context that collects the page's uncaught script errors.  Playwright never
downloads a browser here: ``executable_path`` points at Debian's.
"""

import os

import pytest

from tests.needs import require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

try:
    from playwright import sync_api
except ImportError:  # pragma: no cover - the test extra installs it
    sync_api = None


def require_browser(what):
    """Playwright's sync API, or skip/fail the calling module (``what``: "the dashboard tests")."""
    require(sync_api is not None, "%s need Playwright for Python (pip install playwright); "
            "they never download a browser" % what, module_level=True)
    require(os.access(CHROMIUM, os.X_OK), "%s need Debian's chromium at %s "
            "(apt-get install chromium)" % (what, CHROMIUM), module_level=True)
    return sync_api


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, timeout_ms, **context_args):
    """A page in a new context of ``browser`` (``context_args``: viewport, locale, ...)
    whose uncaught script errors collect in ``page.js_errors``; the caller closes
    ``page.context``."""
    context = browser.new_context(**context_args)
    context.set_default_timeout(timeout_ms)
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    return page
