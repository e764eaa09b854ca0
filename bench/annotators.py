"""Per-annotator throughput on this machine: images/s at batch 1 vs the configured batch size.

Same images, same model objects, side by side in one run; prints the ratio batched / batch-1.
Models are the offline ones (RapidOCR real; the others tiny random-initialised configs of the
real architectures), so the figures measure the engine's batching, not a real model's cost.

    python bench/annotators.py [--images 8] [--repeat 2] [--only ocr,florence2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from engine.execute import run_stage  # noqa: E402
from engine.registry import stage_class  # noqa: E402
from engine.stage import IMAGE_BYTES_COLUMN, records_to_table  # noqa: E402
from schemas.records import empty_record  # noqa: E402

# case -> (stage name, params, stages run first to give it input annotations)
DETECT = ("detect", {"model": "random:tiny", "family": "detr", "threshold": 0.0, "max_detections": 5})
CAPTIONS = ("florence2", {"model": "random:tiny", "tasks": ["caption"], "max_new_tokens": 16, "num_beams": 1})
CASES: dict[str, tuple[str, dict, list[tuple[str, dict]]]] = {
    "ocr": ("ocr", {"batch_size": 8}, []),
    "florence2": ("florence2", {"model": "random:tiny", "batch_size": 8, "max_new_tokens": 16, "num_beams": 1,
                                "tasks": ["caption", "od"]}, []),
    "detect_detr": ("detect", {**DETECT[1], "batch_size": 8}, []),
    "detect_owlv2": ("detect", {"model": "random:tiny", "family": "owlv2", "batch_size": 8,
                                "vocabulary": ["dog", "cat", "person", "car"]}, []),
    "region_text": ("region_text", {"clip_model": "random:tiny", "captioner": "random:tiny", "max_new_tokens": 8,
                                    "num_beams": 1, "batch_size": 8}, [DETECT]),
    "grounding": ("grounding", {"model": "random:tiny", "box_threshold": 0.0, "text_threshold": 0.0,
                                "batch_size": 8}, [CAPTIONS]),
    "masks": ("masks", {"model": "random:tiny", "targets": ["regions"], "batch_size": 8}, [DETECT]),
}


def image_batch(n: int) -> pa.Table:
    import hashlib
    import io

    from PIL import Image

    from engine.samples import write_samples

    paths = write_samples(Path(os.environ.get("TMPDIR", "/tmp")) / "fld_bench_samples")
    blobs = [p.read_bytes() for p in sorted(paths)][:n]
    while len(blobs) < n:
        blobs += blobs[: n - len(blobs)]
    records = []
    for i, b in enumerate(blobs):
        w, h = Image.open(io.BytesIO(b)).size
        records.append(empty_record({"image_id": hashlib.sha256(b + bytes([i])).hexdigest(), "uri": f"img{i}",
                                     "width": w, "height": h, "source": "bench"}))
    return records_to_table(records).append_column(IMAGE_BYTES_COLUMN, pa.array(blobs, pa.binary()))


def throughput(stage, table: pa.Table, batch_size: int, repeat: int) -> float:
    stage.resources = dataclasses.replace(stage.resources, batch_size=batch_size)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        run_stage(stage, table)
        best = max(best, table.num_rows / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP oversubscription)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    table = image_batch(args.images)
    only = set(filter(None, args.only.split(",")))
    print(f"{'annotator':<16}{'batch':>6}{'img/s b=1':>12}{'img/s batched':>15}{'ratio':>8}")
    for case, (name, params, before) in CASES.items():
        if only and case not in only:
            continue
        inp = table
        for pre_name, pre_params in before:
            inp = run_stage(stage_class(pre_name)(pre_params), inp)
        stage = stage_class(name)(params)
        stage.ensure_setup()
        run_stage(stage, inp.slice(0, 1))  # warm-up
        b1 = throughput(stage, inp, 1, args.repeat)
        bn = throughput(stage, inp, params["batch_size"], args.repeat)
        print(f"{case:<16}{params['batch_size']:>6}{b1:>12.2f}{bn:>15.2f}{bn / b1:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
