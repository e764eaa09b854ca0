"""`fld quickstart` end to end (offline profile): what it prints (the round's summary, the next commands,
which then work) and what its report shows in Chromium (captions with grounded phrases, boxes, masks)."""
from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.views.show import build_report

pytestmark = pytest.mark.slow  # the whole quickstart: ~30 s of CPU, a minute or two on a loaded machine


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    res = subprocess.run([sys.executable, "-m", "engine.cli", "quickstart"], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd, res.stdout + res.stderr  # tables on stdout, messages (the round, the next commands) on stderr


def test_quickstart_says_what_the_round_did_and_what_to_try_next(quickstart):
    cwd, out = quickstart
    line = next(x for x in out.splitlines() if x.startswith("stage 3 round 1: "))
    assert "trained 12 steps (loss " in line and "relabelled 11 images (" in line and " merged" in line
    assert "CLIP score rule: off" in out  # fld stats says why no CLIP rule applies
    tail = out[out.index("next, try:"):].splitlines()[1:]
    commands = [shlex.split(x.strip()) for x in tail if x.strip().startswith("fld ")]
    assert [c[1] for c in commands] == ["query", "show", "export"]
    for cmd in commands:
        res = subprocess.run([sys.executable, "-m", "engine.cli", *cmd[1:]], cwd=cwd, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    assert (cwd / "report.html").stat().st_size > 50_000 and (cwd / "export").is_dir()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.timeout(300)
def test_quickstart_report_draws_captions_boxes_and_masks_in_chromium(quickstart, sync_api):
    from helpers import CHROMIUM, FLAGS

    cwd, _ = quickstart
    report = cwd / "screenshot-report.html"
    assert build_report(cwd / "out" / "quickstart", report, step="stage2") == 11
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(report.as_uri())
            card = page.locator("article.card").filter(has_text="photo_darknet_dog.jpg")
            card.scroll_into_view_if_needed()
            caption = card.locator("ul.captions li").first
            assert caption.is_visible() and "dog" in caption.inner_text()
            assert card.locator("b.phrase").first.is_visible()  # a grounded phrase, coloured like its box
            assert card.locator(".layer-objects rect").count() >= 2 and card.locator(".layer-objects rect").first.is_visible()
            assert card.locator(".layer-masks path.mask-outline").count() >= 2
            assert page.is_checked("#layer-masks")  # few masks: shown at start
            svg = card.locator("svg.annotated")
            with_all = _png(svg.screenshot())
            page.click("label[for=layer-masks]")
            no_masks = _png(svg.screenshot())
            page.click("label[for=layer-objects]")
            page.click("label[for=layer-groundings]")
            bare = _png(svg.screenshot())
            page.click("label[for=layer-masks]")
            page.click("label[for=layer-objects]")
            page.click("label[for=layer-groundings]")
            card.screenshot(path=str(cwd / "card.png"))
            page.screenshot(path=str(cwd / "report.png"))
        finally:
            browser.close()
    # masks and boxes change visible pixels: they are drawn, not only present in the markup
    assert (np.abs(with_all - no_masks).sum(axis=2) > 30).mean() > 0.01
    assert (np.abs(no_masks - bare).sum(axis=2) > 30).mean() > 0.002
