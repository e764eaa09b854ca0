"""CLIP-score throughput: the same crops of real photos, the same model, scored one region at a
time (one image forward + one text forward per region, what a per-annotation loop does) vs
the clip_score stage's batched path (all crops of the batch in chunks, each distinct text once).

    python bench/filters.py                       # random:tiny and random:ViT-B-32, 64 crops
    python bench/filters.py --models random:ViT-B-32 --crops 128 --chunk 64 --threads 2

Prints crops/s side by side, the speed-up ratio and the largest score difference (the two
paths must agree: batching is not allowed to change the numbers).
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ["person", "dog", "cat", "car", "bicycle", "horse", "bird", "a red flag", "STOP", "a white mug on a table"]


def real_photos() -> list:
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]
    for path in sorted(glob.glob("/usr/share/darknet/data/*.jpg"))[:4]:
        photos.append(Image.open(path).convert("RGB"))
    return photos


def make_crops(n: int, seed: int = 0) -> tuple[list, list[str]]:
    from filters.clip_score import crop_box

    rng = random.Random(seed)
    photos = real_photos()
    crops, texts = [], []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = rng.uniform(0.1, 0.6) * im.width, rng.uniform(0.1, 0.6) * im.height
        x0, y0 = rng.uniform(0, im.width - w), rng.uniform(0, im.height - h)
        crops.append(crop_box(im, [x0, y0, x0 + w, y0 + h]))
        texts.append(LABELS[i % len(LABELS)])
    return crops, texts


def bench_model(ref: str, crops: list, texts: list[str], chunk: int, repeat: int) -> dict:
    import torch

    from filters.clip_score import ClipScoreFilter

    stage = ClipScoreFilter({"model": ref, "clip_batch_size": chunk})
    stage.ensure_setup()
    clip = stage.clip

    def one_at_a_time() -> list[float]:
        return [(clip.encode_images([c]) @ clip.encode_texts([t]).T).item() for c, t in zip(crops, texts)]

    def batched() -> list[float]:
        return stage.pair_scores(crops, texts)

    one_at_a_time(), batched()  # warm-up (allocator, lazy init)
    times = {}
    scores = {}
    for name, fn in (("batch 1", one_at_a_time), ("batched", batched)):
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            scores[name] = fn()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    diff = max(abs(a - b) for a, b in zip(scores["batch 1"], scores["batched"]))
    return {
        "model": ref,
        "params_M": sum(p.numel() for p in clip.model.parameters()) / 1e6,
        "device": clip.device,
        "threads": torch.get_num_threads(),
        "crops/s batch 1": len(crops) / times["batch 1"],
        "crops/s batched": len(crops) / times["batched"],
        "ratio": times["batch 1"] / times["batched"],
        "max |score diff|": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:tiny,random:ViT-B-32")
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="crops per forward pass in the batched path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    crops, texts = make_crops(args.crops)
    rows = [bench_model(ref, crops, texts, args.chunk, args.repeat) for ref in args.models.split(",")]
    table = Table(title=f"clip_score: {args.crops} crops of real photos, chunk {args.chunk}")
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("model", "device") else "right")
    for r in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
