"""fld show: one self-contained HTML page; annotations as SVG layers over real photos, the run's
models (warning on random ones), funnel and histograms with the pipeline's thresholds, the
quarantine, captions without Florence-2 tokens, and every user string escaped."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.views.show import build_report, visible_text
from engine.stage import records_to_table
from helpers import make_report_store, rect_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def report(tmp_path, photos):
    store = make_report_store(tmp_path / "out", photos)
    dest = tmp_path / "report.html"
    assert build_report(store.out, dest) == 2
    return dest.read_text()


def _layer(page: str, name: str) -> str:
    return re.search(rf'<g class="layer layer-{name}">(.*?)</g>', page, re.S).group(1)


def test_visible_text_drops_florence_tokens_whole_and_cut():
    assert visible_text("<loc_1>a dog<loc_22><loc_333>") == "a dog"
    assert visible_text("loc_810><loc_3> person") == " person"  # a span that starts inside a token
    assert visible_text("a cup<loc_12><lo") == "a cup" and visible_text("a cup<") == "a cup"
    assert visible_text("<poly>x</poly><sep>y<and>z") == "xyz"
    assert visible_text("a < b > c, 3 cups") == "a < b > c, 3 cups"
    text = "<loc_5>a cup<loc_9>"
    assert visible_text(text, 3, 12) == "a cup"  # a slice that cuts tokens at both ends


def test_layers_are_drawn_over_the_embedded_photo(report):
    page = report
    assert page.count('<svg class="annotated"') == 2
    assert len(re.findall(r'<image href="data:image/jpeg;base64,[A-Za-z0-9+/=]{1000,}"', page)) == 2
    objects = _layer(page, "objects")
    assert '<rect x="150.0" y="100.0" width="300.0" height="200.0"' in objects and "<title>a white cup (0.90)</title>" in objects
    assert '<polygon points="20.0,330.0 220.0,335.0 218.0,370.0 22.0,366.0"' in _layer(page, "ocr")
    masks = _layer(page, "masks")
    assert "M 480.0 120.0 L 530.0 20.0 L 580.0 120.0 Z" in masks  # from the region's polygon
    # from its RLE mask: the polygon traces the pixel edges of the 300x200 mask (schemas.geometry)
    assert "M 150.0 100.0 L 450.0 100.0 L 450.0 300.0 L 150.0 300.0 Z" in masks, masks[:2000]
    grounding = re.search(r'<rect x="150.0" y="100.0"[^>]*stroke="(#[0-9a-f]{6})" stroke-dasharray', _layer(page, "groundings"))
    assert grounding, "the grounding box is drawn dashed"
    # the phrase has its box's colour, and the caption has no location token left
    assert f'<b class="phrase" style="color:{grounding.group(1)}">a cup</b> of coffee on a table' in page
    assert masks.count("<title>mask:") == 3  # r1, r4 and g1, each drawn once, light fill with an outline
    assert 'fill-opacity="0.18"' in masks and 'class="mask-outline"' in masks
    assert 'id="layer-masks" class="toggle" checked>' in page  # few masks: shown at start
    dropped = _layer(page, "dropped")
    assert "<title>dropped by region_filter:low_score: spoon (0.20)</title>" in dropped
    assert 'id="layer-dropped" class="toggle">' in page and 'id="layer-objects" class="toggle" checked>' in page


def test_header_funnel_histograms_and_quarantine(report):
    page = report
    assert "pipeline <b>quickstart</b>" in page and "profile <b>offline</b>" in page
    warning = re.search(r"<div class='warning' id='random-models'>(.*?)</div>", page, re.S).group(1)
    # offline, the quickstart's only random model is stage 3's Florence-2; this step has none of its annotations
    assert "florence2 = random:tiny (used by refine): none of this step&#x27;s annotations come from it" in warning
    assert "grounding_dino" not in warning and "sam" not in warning  # not used: composed groundings, GrabCut
    assert "CLIP score rule: off - no real CLIP model is available (clip = random:tiny)" in page
    assert "<td>ocr</td><td>rapidocr</td><td>ocr</td>" in page  # a real model is listed, not warned about
    assert '<svg class="funnel"' in page and "region_filter" in re.search(r'<svg class="funnel".*?</svg>', page, re.S).group(0)
    score = re.search(r"<figure class='hist'><svg.*?>score</text><text[^>]*>regions, n=5.*?</figure>", page, re.S).group(0)
    # the quickstart keeps region_filter's default min_score per kind: both cuts are marked
    assert "<title>object min_score = 0.3</title>" in score and "<title>text min_score = 0.5</title>" in score
    quarantine = re.search(r"<section id='quarantine'>.*?</section>", page, re.S).group(0)
    assert "Quarantine (3 inputs not used)" in quarantine and "<td>truncated</td>" in quarantine


def test_self_contained_and_everything_escaped(report):
    page = report
    assert "<script" not in page.lower(), "no script at all: toggles are CSS, user text is escaped"
    assert page.count("&lt;script&gt;window.__pwned=1&lt;/script&gt;[/bold]") >= 6  # uri, caption, label, reason, quarantine, error
    assert "COFFEE &amp; &lt;b&gt;" in page and "<b>" not in _layer(page, "ocr")
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert links and all(link.startswith("data:") for link in links), [x[:40] for x in links if not x.startswith("data:")]
    assert not re.search(r"@import|url\(|<link\b|<iframe\b", page, re.I)
    assert not re.search(r"loc_\d", page), "no Florence-2 location token, whole or cut, reaches the page"


def test_no_warning_when_every_model_is_real(tmp_path, photos):
    store = make_report_store(tmp_path / "out", photos, pipeline="fld", profile=None)
    build_report(store.out, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "random-models" not in page and "<td>florence2</td><td>florence-community/Florence-2-large</td>" in page
    assert "CLIP score rule" not in page  # a real CLIP: the rule applies


def test_a_broken_record_does_not_block_the_report(tmp_path, photos):
    store = make_report_store(tmp_path / "out", photos)
    recs = store.read_shard("annotations/stage2", "part-00000").to_pylist()
    recs[1]["regions"][0]["box"] = [1.0, 2.0]  # not a box: this card cannot be drawn
    store.write_shard("annotations/stage2", "part-00000", records_to_table(recs))
    assert build_report(store.out, tmp_path / "r.html") == 2
    page = (tmp_path / "r.html").read_text()
    assert "could not draw this record (part-00000): ValueError" in page and page.count('<svg class="annotated"') == 1


def test_cli_show_with_markup_in_the_path(tmp_path, photos):
    store = make_report_store(tmp_path / "out", photos)
    dest = tmp_path / "new" / "[/bold] report.html"  # a folder "[" inside a folder that does not exist yet
    res = CliRunner().invoke(app, ["show", str(store.out), "--out", str(dest), "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert "[/bold] report.html (1 images)" in res.output and dest.exists()
    res = CliRunner().invoke(app, ["show", str(store.out), "--step", "nope"])
    assert res.exit_code == 2 and "no committed step 'nope'" in res.output


def test_many_masks_start_hidden_and_a_shared_mask_is_drawn_once():
    from engine.views.show import MANY_MASKS, MaskLayer, _toggles

    assert 'id="layer-masks" class="toggle">' in _toggles({"masks": MANY_MASKS + 1})
    assert 'id="layer-masks" class="toggle" checked>' in _toggles({"masks": MANY_MASKS})
    layer = MaskLayer(60, 40, 1024)
    rle = rect_mask(40, 60, (10, 10, 30, 30))
    assert layer.add({"mask": rle}, "#e6194b", "cup") and not layer.add({"mask": rle}, "#3cb44b", "a cup")
    assert layer.svg().count("<path") == 1
