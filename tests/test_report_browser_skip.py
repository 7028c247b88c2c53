"""Without Chromium the browser tests are skipped with one line in the pytest summary saying why and how to install it."""

from __future__ import annotations

from pathlib import Path

import tests.conftest as shared

pytest_plugins = ["pytester"]


def test_missing_browser_is_one_summary_line(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(shared, "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setattr(shared, "_browser_skips", [])  # this session's own summary stays as it was
    pytester.makeconftest("from tests.conftest import browser, pytest_terminal_summary  # noqa: F401\n")
    pytester.makepyfile("def test_page(browser):\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    lines = [line for line in result.outlines if "browser test(s) of the report skipped" in line]
    assert lines == ["1 browser test(s) of the report skipped: headless Chromium needs /nonexistent/chromium and "
                     "/usr/bin/chromedriver (apt-get install chromium chromium-driver)"]
