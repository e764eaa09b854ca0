"""Progress lines: no rate (and no ETA) before there is time to measure one."""
from __future__ import annotations

import io

import engine.progress as progress


def test_first_tick_prints_no_absurd_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    p = progress.PlainProgress("stage1", total_images=11, total_shards=3, out=out, every=0.0)
    now[0] += 0.2
    p.batch("detect", 4)  # the stage's first batch, 0.2 s into the step
    first = out.getvalue()
    assert "detect: 4/11 images\n" in first and "images/s" not in first.split("committed")[0]
    now[0] += 1.8
    p.batch("detect", 4)  # 8 images in 2 s since the step started
    assert "detect: 8/11 images, 4.00 images/s, ETA 1s" in out.getvalue()
