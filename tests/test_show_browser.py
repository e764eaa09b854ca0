"""fld show in a real browser (Debian's chromium, headless, driven by Playwright): layers toggle
their SVG elements, a dropped box shows its reason on hover, nothing is fetched, no injected
script runs; a screenshot is saved in the test's folder. CI installs chromium (.ci/run); with CI=true a missing
chromium fails the test instead of skipping it."""
from __future__ import annotations

import pytest

from engine.views.show import build_report
from helpers import CHROMIUM, FLAGS, make_report_store

def _displays(page, selector: str) -> set[str]:
    return set(page.eval_on_selector_all(selector, "els => els.map(e => getComputedStyle(e).display)"))


@pytest.mark.timeout(180)
def test_layers_toggle_and_dropped_reasons_show_in_chromium(tmp_path, photos, sync_api):
    store = make_report_store(tmp_path / "out", photos)
    report = tmp_path / "report.html"
    build_report(store.out, report)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri())

            svg = page.locator("svg.annotated").first
            assert svg.bounding_box()["width"] > 300  # drawn, at the card's width
            cup = page.locator(".layer-objects rect").filter(has_text="a white cup").first
            assert cup.is_visible() and _displays(page, ".layer-objects") == {"inline"}

            page.click("label[for=layer-objects]")  # switch the objects layer off ...
            assert not page.is_checked("#layer-objects")
            assert _displays(page, ".layer-objects") == {"none"} and not cup.is_visible()
            assert page.locator(".layer-groundings rect").first.is_visible()  # ... the others stay
            page.click("label[for=layer-objects]")  # ... and on again
            assert _displays(page, ".layer-objects") == {"inline"} and cup.is_visible()

            spoon = page.locator("rect.dropped-box").filter(has_text="region_filter:low_score")
            assert not spoon.is_visible()  # dropped annotations start hidden
            assert not page.locator("li.dropped-text").first.is_visible()
            page.click("label[for=layer-dropped]")
            assert spoon.is_visible() and page.locator("li.dropped-text").first.is_visible()
            spoon.hover(timeout=10_000)  # fails if another element covers it: the hover target is this box
            assert spoon.evaluate("el => el.matches(':hover')")
            assert spoon.evaluate("el => el.querySelector('title').textContent") == \
                "dropped by region_filter:low_score: spoon (0.20)"

            assert page.evaluate("typeof window.__pwned") == "undefined" and not errors
            assert all(u.startswith(("file://", "data:")) for u in requests), requests
            page.locator("article.card").first.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "report.png"))
            page.locator("article.card").first.screenshot(path=str(tmp_path / "card.png"))
        finally:
            browser.close()
    for name in ("report.png", "card.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 20_000
