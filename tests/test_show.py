"""fld show: a self-contained HTML page with drawn annotations and colour-linked phrases."""
import base64
import io
import re

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.stage import records_to_table, table_to_records
from engine.store import ShardStore
from schemas.records import new_annotation, source_of
from test_export import out  # noqa: F401  (fixture: a store with kept and dropped annotations)


def _add_grounding(store_dir):
    store = ShardStore(store_dir)
    rec = table_to_records(store.read_shard("annotations/stage1", "part-00000"))[0]
    rec["groundings"] = [new_annotation(source_of("unit"), 0.9, ann_id="g1", text_ann_id="t1", phrase="a cup",
                                        char_start=0, char_end=5, box=[150, 100, 450, 300], mask=None)]
    store.write_shard("annotations/stage1", "part-00000", records_to_table([rec]))


def test_report_draws_annotations_and_links_phrases(out, tmp_path):  # noqa: F811
    _add_grounding(out)
    report = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["show", str(out), "--out", str(report)])
    assert res.exit_code == 0, res.output
    page = report.read_text()
    assert "coffee.png" in page and "text_filter:too_few_objects x1" in page and "region_filter:low_score x1" in page
    colored = re.search(r'<b style="color:(#[0-9a-f]{6})">a cup</b> of coffee', page)
    assert colored, "the grounded phrase is coloured in its caption"
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    rgb = tuple(int(colored.group(1)[i : i + 2], 16) for i in (1, 3, 5))
    # the grounding box is drawn in the phrase's colour (the 600x400 image is not rescaled)
    assert (img == rgb).all(axis=-1).sum() > 400
