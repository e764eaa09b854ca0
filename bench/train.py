"""Florence-2 training and relabelling throughput: samples/s and images/s, CPU vs CUDA side by side.

    python bench/train.py                          # tiny config on CPU (+ CUDA when present)
    python bench/train.py --preset base --devices cuda --steps 30 --batch-size 8

Training runs refine.trainer.Florence2Trainer (the real path: streamed shards, task-balanced draws,
collator, AdamW, cosine schedule, autocast on CUDA) on real photos (scikit-image) with <CAPTION> +
<OD> + <REGION_TO_DESCRIPTION> examples written as a store; the first `--warmup` steps are excluded.
Relabelling runs Florence2Model.generate for <OD> (num_beams 3, as the hub default) in batches.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_dataset(n_images: int):
    """Real photos with a caption and boxes (geometry synthetic but valid), as records + images."""
    import pyarrow as pa
    from PIL import Image
    from skimage import data as skdata

    from engine.stage import records_to_table
    from engine.store import ShardStore
    from schemas.records import IMAGES_SCHEMA, empty_record, make_ann_id, new_annotation, source_of

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
    src = source_of("bench")
    records, ids, blobs = [], [], []
    for i in range(n_images):
        arr = getattr(skdata, names[i % len(names)])()
        img = Image.fromarray(arr).convert("RGB")
        if i >= len(names):  # distinct images (distinct ids) beyond the five photos
            img = img.rotate(90 * (i // len(names)), expand=True)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blob = buf.getvalue()
        iid = hashlib.sha256(blob).hexdigest()
        w, h = img.size
        rec = empty_record({"image_id": iid, "uri": f"bench{i}", "width": w, "height": h, "source": "bench"})
        rec["texts"] = [new_annotation(src, ann_id=make_ann_id(iid, "b", "t", 0), tier="brief", text=f"a photo of a {names[i % 5]}")]
        rec["regions"] = [
            new_annotation(src, 0.9, ann_id=make_ann_id(iid, "b", "r", k), kind="object",
                           box=[w * k / 8, h * k / 8, w * (k + 4) / 8, h * (k + 4) / 8], quad=None, polygon=None,
                           mask=None, label=f"object {k}", brief=f"a small object number {k}")
            for k in range(4)
        ]
        records.append(rec)
        ids.append(iid)
        blobs.append(blob)
    images = pa.table({"image_id": ids, "bytes": pa.array(blobs, pa.binary())})
    store = ShardStore(tempfile.mkdtemp(prefix="fld_train_bench_"))
    rows = [{"image_id": r["image_id"], "uri": r["uri"], "source": "bench", "width": r["width"], "height": r["height"],
             "format": "PNG", "mode": "RGB", "bytes": b, "human": None} for r, b in zip(records, blobs)]
    store.write_shard("images", "part-00000", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
    store.write_shard("annotations/bench", "part-00000", records_to_table(records))
    return store, images


def bench_train(preset: str, device: str, steps: int, warmup: int, batch_size: int, store) -> dict:
    from engine.training import TrainJob, World
    from refine.trainer import Florence2Trainer, read_log

    folder = f"models/{preset}-{device}-{time.time_ns()}"
    job = TrainJob("bench", Florence2Trainer,
                   {"start": f"random:{preset}", "codec": {"tasks": ["<CAPTION>", "<OD>", "<REGION_TO_DESCRIPTION>"]},
                    "train": {"steps": warmup + steps + 1, "batch_size": batch_size, "lr": 1e-4, "warmup_steps": 1,
                              "log_every": 1, "checkpoint_every": 10**9, "precision": "auto"}},
                   {}, "annotations/bench", folder, "bench")
    t0 = time.perf_counter()
    result = job.build().fit(store, job, World(device=device), stop_after=warmup + steps)
    wall = time.perf_counter() - t0
    history = read_log(store.local_dir(folder))
    rates = [h["samples_per_s"] for h in history[warmup:] if h.get("samples_per_s")]
    return {"train_samples_per_s": statistics.median(rates) if rates else float("nan"), "train_wall_s": wall,
            "first_loss": result["first_loss"], "last_loss": result["last_loss"]}


def bench_relabel(preset: str, device: str, images, batch_size: int, max_new_tokens: int, rounds: int) -> dict:
    from annotators.florence2_model import Florence2Model
    from engine.stage import decode_image

    model = Florence2Model.load(f"random:{preset}", device=device)
    pixels = [decode_image(b) for b in images.column("bytes").to_pylist()]
    batch = (pixels * ((batch_size // len(pixels)) + 1))[:batch_size]
    model.generate(batch, "<OD>", max_new_tokens=max_new_tokens, num_beams=3)  # warm-up
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        model.generate(batch, "<OD>", max_new_tokens=max_new_tokens, num_beams=3, min_new_tokens=max_new_tokens)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return {"relabel_images_per_s": rounds * len(batch) / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="random:<preset> of annotators.florence2_model (tiny | base)")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+ cuda when present)")
    ap.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the rate")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--relabel-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="forced length of each relabel generation")
    ap.add_argument("--relabel-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads; 1 is fastest on a shared 2-core host (OpenMP oversubscription)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("--devices cuda: no CUDA device visible")
    data, images = photo_dataset(args.images)
    print(f"Florence-2 random:{args.preset}, {args.images} images (<CAPTION>, <OD>, <REGION_TO_DESCRIPTION>), batch {args.batch_size}, "
          f"{args.steps} measured steps (+{args.warmup} warm-up), torch {torch.__version__}, {args.threads} CPU threads")
    rows = {}
    for dev in devices:
        name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
        r = bench_train(args.preset, dev, args.steps, args.warmup, args.batch_size, data)
        r |= bench_relabel(args.preset, dev, images, args.relabel_batch, args.max_new_tokens, args.relabel_rounds)
        rows[dev] = r
        print(f"  {dev:5s} ({name}): train {r['train_samples_per_s']:8.2f} samples/s   relabel <OD> "
              f"{r['relabel_images_per_s']:8.2f} images/s ({args.max_new_tokens} tokens, 3 beams)   "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    if "cpu" in rows and "cuda" in rows:
        c, g = rows["cpu"], rows["cuda"]
        print(f"  ratio cuda/cpu: train x{g['train_samples_per_s'] / c['train_samples_per_s']:.1f}   "
              f"relabel x{g['relabel_images_per_s'] / c['relabel_images_per_s']:.1f}")


if __name__ == "__main__":
    main()
