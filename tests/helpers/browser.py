"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright, which downloads
no browser) for the tests that look at the MLflow UI as a user does."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE_SERVICES = os.environ.get("MEDLIT_REQUIRE_SERVICES") == "1"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("MEDLIT_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A new browser page; skipped without Playwright or Chromium, except in CI
    (``MEDLIT_REQUIRE_SERVICES=1``), where their absence fails the test."""
    if REQUIRE_SERVICES:
        playwright = importlib.import_module("playwright.sync_api")
    else:
        playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        if REQUIRE_SERVICES:
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"no {CHROMIUM} (Debian: apt-get install chromium)")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
