"""The benchmark's outputs: results.json (everything measured), a plot of each metric by round
(SVG, matplotlib), and the Markdown tables, written into the report between markers so the
prose around them (the analysis) is kept when the command rewrites the numbers.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

BEGIN, END = "<!-- bench.quality:begin (written by python -m bench.quality; do not edit) -->", "<!-- bench.quality:end -->"

# (metric key, column label) in table order
METRICS = (
    ("box_map", "box mAP"), ("box_ap50", "box AP50"), ("obj_precision", "object precision@0.5"),
    ("obj_recall", "object recall@0.5"), ("category_accuracy", "category accuracy"), ("brief_accuracy", "region brief accuracy"),
    ("mask_iou", "mask IoU"), ("ocr_precision", "OCR precision@0.5"), ("ocr_recall", "OCR recall@0.5"), ("ocr_cer", "OCR CER"),
    ("grounding_accuracy", "grounding accuracy"), ("groundings_kept", "groundings kept"),
    ("brief_f1", "brief caption token F1"), ("brief_coverage", "brief caption coverage"),
    ("brief_object_precision", "brief object precision"), ("brief_attribute_recall", "brief attribute recall"),
    ("detailed_f1", "detailed caption token F1"), ("detailed_coverage", "detailed caption coverage"),
    ("detailed_object_precision", "detailed object precision"), ("detailed_attribute_recall", "detailed attribute recall"),
    ("detailed_relation_recall", "detailed relation recall"), ("obj_kept", "object regions kept"),
)
PLOTTED = ("box_map", "obj_precision", "obj_recall", "category_accuracy", "mask_iou", "ocr_cer",
           "grounding_accuracy", "brief_f1", "detailed_f1", "brief_object_precision", "detailed_attribute_recall",
           "detailed_relation_recall")
LOWER_IS_BETTER = {"ocr_cer"}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _versions(res) -> list[str]:
    seen = []
    for row in res.metrics:
        if row["version"] not in seen:
            seen.append(row["version"])
    return seen


def quality_tables(res) -> list[str]:
    """Per split and noise: one row per metric, one column per dataset version."""
    out = []
    versions = _versions(res)
    for split in ("heldout", "train"):
        for noise in ("mild", "harsh"):
            rows = {r["version"]: r["metrics"] for r in res.metrics if r["split"] == split and r["noise"] == noise}
            title = "held-out split (no image of it trained any model)" if split == "heldout" else "train split (the images the rounds trained on)"
            images = next((m.get("images") for m in rows.values() if "images" in m), "?")
            out.append(f"#### {noise} noise, {title}: {images} images\n")
            out.append("| metric | " + " | ".join(versions) + " |")
            out.append("|---|" + "---|" * len(versions))
            for key, label in METRICS:
                out.append(f"| {label} | " + " | ".join(_cell(rows.get(v, {}).get(key)) for v in versions) + " |")
            errors = {v: m["error"] for v, m in rows.items() if "error" in m}
            for v, e in errors.items():
                out.append(f"\n{v}: not measured ({e})")
            out.append("")
    return out


def cost_table(res) -> list[str]:
    out = ["| noise | arm | split | step | seconds | images/s | note |", "|---|---|---|---|---|---|---|"]
    for c in res.costs:
        note = ""
        if c["step"].startswith("round"):
            loss = c.get("train_loss") or [None, None]
            note = (f"train + relabel + filter + merge; training {c.get('train_samples_per_s') or 0:.1f} samples/s, "
                    f"loss {_cell(loss[0])} -> {_cell(loss[1])}") if c.get("trained") else "relabel + filter + merge (model from the train split)"
        out.append(f"| {c['noise']} | {c['arm']} | {c['split']} | {c['step']} | {_cell(c['seconds'])} | {_cell(c['images_per_s'])} | {note} |")
    return out


def params_table(res) -> list[str]:
    out = ["| noise | specialist | parameters |", "|---|---|---|"]
    for noise, stages in res.specialists.items():
        for stage, params in stages.items():
            out.append(f"| {noise} | {stage} | " + ", ".join(f"{k}={v}" for k, v in params.items()) + " |")
    return out


def clip_table(res) -> list[str]:
    c = res.clip
    out = ["| pairs | held-out ROC AUC | train ROC AUC | held-out mean cosine true / corrupted |", "|---|---|---|---|"]
    for kind in ("caption", "region", "ocr"):
        h, t = c["auc"]["heldout"][kind], c["auc"]["train"][kind]
        out.append(f"| {kind} ({h['pairs']} held-out) | {_cell(h['auc'])} | {_cell(t['auc'])} | "
                   f"{_cell(h['mean_true'])} / {_cell(h['mean_corrupted'])} |")
    cfg = c["config"]
    out.append("")
    out.append(f"CLIP: ViT {cfg['image_size']} px / patch {cfg['patch_size']}, width {cfg['width']} x {cfg['layers']} layers, "
               f"text width {cfg['text_width']} x {cfg['text_layers']}; {cfg['steps']} steps of {cfg['batch_size']} pairs "
               f"(+ one hard negative each), loss {c['first_loss']} -> {c['last_loss']}, {c['train_seconds']} s. "
               f"clip_score thresholds (Youden cut on the train split's pairs): region {c['thresholds']['region']}, "
               f"text {c['thresholds']['text']}.")
    return out


def markdown(res, plot_name: str | None) -> str:
    s = res.seconds
    lines = [BEGIN, "",
             f"Size `{res.size}`, {res.rounds} rounds, runner `{getattr(res, 'runner', 'local')}`, {res.jobs} parallel "
             f"refinement chain(s); total {s.get('total')} s "
             f"(world {s.get('world')} s, CLIP {s.get('clip')} s, engine {s.get('engine')} s, metrics {s.get('metrics')} s); "
             f"CPU time {res.machine.get('cpu_seconds')} s; machine: {res.machine.get('cpus')} CPUs, load average at the end "
             f"{res.machine.get('loadavg_at_end')} (other processes share the machine: wall seconds include their load).", ""]
    lines += ["### Label quality by dataset version", ""] + quality_tables(res)
    if plot_name:
        lines += [f"![each metric by round]({plot_name})", ""]
    lines += ["### CLIP scorer (stage 2), measured before use", ""] + clip_table(res) + [""]
    lines += ["### Specialist error rates", ""] + params_table(res) + [""]
    lines += ["### Cost of each step", ""] + cost_table(res) + ["", END]
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    """Each plotted metric by position in the engine (specialists, filters, rounds), per noise x arm x split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rounds = res.rounds
    xs_labels = ["specialists", "+ filters"] + [f"round {k}" for k in range(1, n_rounds + 1)]
    fig, axes = plt.subplots(3, 4, figsize=(18, 11))
    colours = {("mild", "full"): "tab:blue", ("mild", "nofilter"): "tab:cyan", ("harsh", "full"): "tab:red", ("harsh", "nofilter"): "tab:orange"}
    for ax, key in zip(axes.flat, PLOTTED):
        for (noise, arm), colour in colours.items():
            for split, style in (("heldout", "-"), ("train", ":")):
                pts = []
                for r in res.metrics:
                    if r["noise"] != noise or r["split"] != split or "error" in r["metrics"]:
                        continue
                    if r["folder"] == "stage1":
                        x = 0
                    elif r["folder"] == "stage2":
                        if arm != "full":
                            continue
                        x = 1
                    elif r["arm"] == arm:
                        x = 1 + int(r["folder"][5:])
                    else:
                        continue
                    if r["metrics"].get(key) is not None:
                        pts.append((x, r["metrics"][key]))
                pts.sort()
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, marker="o", ms=3,
                            label=f"{noise} {'full engine' if arm == 'full' else 'no filters'} {split}")
        ax.set_title(key + (" (lower is better)" if key in LOWER_IS_BETTER else ""), fontsize=10)
        ax.set_xticks(range(len(xs_labels)))
        ax.set_xticklabels(xs_labels, rotation=30, fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle("Label quality against ground truth by step and round (solid: held-out split, dotted: train split)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, metadata={"Date": None})  # no timestamp: reruns with the same numbers give the same file
    plt.close(fig)


def write_outputs(res, results_dir: Path, report: Path | None) -> list[Path]:
    """results.json + quality_by_round.svg in results_dir; the tables into `report` between the markers."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    data = asdict(res)
    (results_dir / "results.json").write_text(json.dumps(data, indent=1, default=str))
    written.append(results_dir / "results.json")
    plot_path = results_dir / "quality_by_round.svg"
    plot(res, plot_path)
    written.append(plot_path)
    md = markdown(res, None)
    (results_dir / "tables.md").write_text(md + "\n")
    written.append(results_dir / "tables.md")
    print(md)
    if report is not None:
        report = Path(report)
        rel = Path(__import__("os").path.relpath(plot_path, report.parent))
        block = markdown(res, rel.as_posix())
        text = report.read_text() if report.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        report.write_text(text)
        written.append(report)
    return written
