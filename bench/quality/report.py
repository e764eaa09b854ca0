"""The benchmark's outputs (stages 1 + 2 over world x specialist seeds): results.json (the figures),
annotations.parquet (one row per scored annotation of each dataset version, with status, drop reason
and correctness: every stated fact can be re-queried with DuckDB), one precision-recall SVG per
filter rule, and the Markdown tables, written into the report between markers so the prose around
them (the findings) is kept when the command rewrites the numbers.

Cells are "mean [95% interval]": the mean over the runs (world seed x specialist seed) of each run's
figure; the interval is a hierarchical percentile bootstrap (runs resampled, then held-out images
within each run: controls.bootstrap), for mAP a bootstrap over runs only (it has no per-image counts).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- bench.quality:begin (written by python -m bench.quality; do not edit) -->", "<!-- bench.quality:end -->"
SMOKE_BANNER = ("> **SMOKE TEST (`--small`): a handful of images, one seed, a CLIP trained for a few steps. These numbers "
                "check that the benchmark runs end to end; they are not a result.**")
OBJECT_COLS = (("obj_precision", "object P@0.5"), ("obj_recall", "object R@0.5"), ("obj_f1", "object F1"),
               ("box_map", "box mAP"), ("category_accuracy", "category acc."))
OTHER_COLS = (("ocr_precision", "OCR P"), ("ocr_recall", "OCR R"), ("ocr_f1", "OCR F1"),
              ("grounding_accuracy", "grounding acc."), ("groundings_per_image", "groundings / image"),
              ("brief_object_precision", "brief obj. P"), ("brief_coverage", "brief coverage"),
              ("detailed_object_precision", "detailed obj. P"), ("detailed_attribute_recall", "detailed attr. R"))
ENSEMBLE = "ensemble of 3 detectors + vote"
OBJECT_ONLY = {ENSEMBLE}  # versions whose other annotation types are not the benchmark's (no captioner, unfiltered OCR)


def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _cell(c: dict | None) -> str:
    if not c or c.get("mean") is None:
        return "-"
    return f"{_f(c['mean'])} [{_f(c['ci'][0])}, {_f(c['ci'][1])}]" if c.get("ci") else _f(c["mean"])


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    from engine.views.calibrate import wilson as _w

    ci = _w(k, n, z)
    return list(ci) if ci else None


def _measures(res, noise: str) -> list[dict]:
    return [m for wr in res.worlds for m in wr["measures"] if m["tag"]["noise"] == noise]


def summary(res) -> dict:
    """noise -> version -> metric -> {mean, ci}."""
    from bench.quality.controls import bootstrap, runs_interval

    out: dict = {}
    for noise in ("mild", "harsh"):
        ms = _measures(res, noise)
        if not ms:
            continue
        out[noise] = {}
        for version in ms[0]["versions"]:
            cells = bootstrap([np.asarray(m["counts"][version]) for m in ms], res.resamples)
            cells["box_map"] = runs_interval([m["versions"][version].get("box_map") for m in ms], res.resamples)
            kept = np.array([[*m["keep"][version][k]] for m in ms for k in ("object",)], float)
            cells["object_keep_rate"] = {"mean": float(kept[:, 0].sum() / kept[:, 1].sum()) if kept[:, 1].sum() else None, "ci": None}
            out[noise][version] = cells
    return out


def quality_tables(res, summ: dict) -> list[str]:
    n_runs = len(res.world_seeds) * len(res.specialist_seeds)
    out = []
    for noise, versions in summ.items():
        images = sum(int(np.asarray(m["counts"]["specialists"]).shape[0]) for m in _measures(res, noise))
        for title, cols in (("objects", OBJECT_COLS), ("OCR, groundings, captions", OTHER_COLS)):
            out += [f"#### {noise} noise, held-out split: {title} ({n_runs} runs, {images} held-out images in all)", "",
                    "| version | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
            for version, cells in versions.items():
                if version in OBJECT_ONLY and title != "objects":
                    continue
                out.append(f"| {version} | " + " | ".join(_cell(cells.get(k)) for k, _ in cols) + " |")
            out.append("")
    return out


def clip_table(res) -> list[str]:
    out = [f"clip_score rules are switched off where the CLIP's held-out ROC AUC of a pair type the rule reads is below "
           f"{res.auc_min} (`--auc-min`; region rule: region and OCR pairs, text rule: captions).", "",
           "| world seed | region AUC | OCR AUC | caption AUC | region rule | text (caption) rule | thresholds (clip_calib Youden) |",
           "|---|---|---|---|---|---|---|"]
    for wr in res.worlds:
        auc = {k: v.get("auc") for k, v in wr["clip"]["auc"]["heldout"].items()}
        sw = wr["switch"]
        out.append(f"| {wr['world_seed']} | {_f(auc.get('region'))} | {_f(auc.get('ocr'))} | {_f(auc.get('caption'))} | "
                   f"{'on' if sw['region']['on'] else 'OFF'} | {'on' if sw['text']['on'] else 'OFF'} | "
                   f"{json.dumps(wr['clip']['thresholds'])} |")
    return out


def fate_table(res, noise: str) -> list[str]:
    """Per annotation type and drop reason: right vs wrong annotations removed (sums over runs)."""
    tot: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for m in _measures(res, noise):
        for key, (right, wrong) in m["fate"].items():
            kind, reason = key.split("|", 1)
            tot[(kind, reason)][0] += right
            tot[(kind, reason)][1] += wrong
    base: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (kind, _), (r, w) in tot.items():
        base[kind][0] += r
        base[kind][1] += w
    out = [f"#### {noise} noise: the fate of each stage-1 annotation (sums over runs)", "",
           "| type | reason (`kept` or the first filter rule that dropped it) | right | wrong | share wrong [Wilson 95%] | stage-1 share wrong |",
           "|---|---|---|---|---|---|"]
    for (kind, reason), (r, w) in sorted(tot.items(), key=lambda kv: (kv[0][0], kv[0][1] != "kept", kv[0][1])):
        ci = wilson(w, r + w)
        b = base[kind]
        out.append(f"| {kind} | {reason} | {r} | {w} | {_f(w / (r + w))} [{_f(ci[0]) if ci else '-'}, {_f(ci[1]) if ci else '-'}] | "
                   f"{_f(b[1] / sum(b)) if sum(b) else '-'} |")
    return out + [""]


def rule_rows(res, noise: str) -> list[dict]:
    """Per rule: the pooled (value, correct) pairs over runs, AUC with its interval, P/R/F1 at the threshold, the curve."""
    from engine.views.calibrate import auc, auc_interval, pr_curve, prf

    pooled: dict[tuple, dict] = {}
    for m in _measures(res, noise):
        for r in m["rules"]:
            p = pooled.setdefault((r["stage"], r["rule"]), {**{k: r[k] for k in ("stage", "rule", "value_of", "type", "where", "threshold", "upper")},
                                                            "values": [], "labels": []})
            p["values"] += r["values"]
            p["labels"] += r["labels"]
    rows = []
    for p in pooled.values():
        v, y = np.asarray(p["values"], float), np.asarray(p["labels"], bool)
        row = {k: p[k] for k in ("stage", "rule", "value_of", "type", "where", "threshold", "upper")}
        row["n"], row["correct"] = int(len(v)), int(y.sum())
        oriented = -v if p["upper"] else v
        row["auc"] = auc(oriented, y) if len(v) else None
        row["auc_ci"] = auc_interval(oriented, y, res.resamples) if row["auc"] is not None else None
        keep = v <= p["threshold"] if p["upper"] else v >= p["threshold"]
        row["at_threshold"] = prf(keep, y)
        row["curve"] = pr_curve(v, y, p["upper"]) if len(v) and y.any() else []
        rows.append(row)
    return rows


def rule_table(rows: list[dict], noise: str, plots: dict) -> list[str]:
    out = [f"#### {noise} noise: every numeric filter rule against correctness (pooled over runs; threshold sweep: the PR curve)", "",
           "| rule (stage: parameter) | reads | annotations | n (right) | ROC AUC [95% bootstrap] | threshold | P / R / F1 at it | PR curve |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["n"]:
            continue  # a rule with nothing to read (e.g. a caption tier the captioner never writes)
        a, ci = r["at_threshold"], r["auc_ci"]
        where = f" ({r['where'][1]})" if r["where"] else ""
        out.append(f"| {r['stage']}: {r['rule']} | {r['value_of']} | {r['type']}{where} | {r['n']} ({r['correct']}) | "
                   f"{_f(r['auc'])} [{_f(ci[0]) if ci else '-'}, {_f(ci[1]) if ci else '-'}] | {'<=' if r['upper'] else '>='} {_f(r['threshold'], 3)} | "
                   f"{_f(a['precision'])} / {_f(a['recall'])} / {_f(a['f1'])} | "
                   + (f"[svg]({plots[(noise, r['stage'], r['rule'])]})" if (noise, r["stage"], r["rule"]) in plots else "-") + " |")
    return out + [""]


def calibration_table(res, noise: str, heldout_rules: list[dict]) -> list[str]:
    """fld calibrate on the labelled train subset: per rule its decision, the fitted threshold, the precision it
    predicted (Wilson interval) and the held-out precision of the rule at that threshold, the held-out AUC."""
    from engine.views.calibrate import auc, prf

    out = [f"#### {noise} noise: `fld calibrate` (engine.views.calibrate) on {int(100 * 0.2)}% of the train images with their truth as "
           f"`human` annotations, target precision 0.9; its overlay applied to the held-out split", "",
           "| world, specialist seed | rule | decision | fitted threshold | train: P at fitted [Wilson 95%] | held-out: P at fitted (n kept) | held-out AUC |",
           "|---|---|---|---|---|---|---|"]
    others: dict[str, int] = defaultdict(int)
    for m in _measures(res, noise):
        cal = m.get("calibration") or {}
        held = {(r["stage"], r["rule"]): r for r in m["rules"]}
        for r in cal.get("rules", []):
            if r["decision"] not in ("fit", "off"):
                others[r["decision"]] += 1
                continue
            h = held.get((r["stage"], r["rule"]))
            held_p, held_auc, kept = None, None, 0
            if h and h["values"]:
                v, y = np.asarray(h["values"], float), np.asarray(h["labels"], bool)
                held_auc = auc(-v if h["upper"] else v, y)
                if r["fitted"] is not None and r["decision"] == "fit":
                    k = prf(v <= r["fitted"] if h["upper"] else v >= r["fitted"], y)
                    held_p, kept = k["precision"], k["kept"]
            at = r.get("at_fitted") or {}
            ci = at.get("precision_ci")
            out.append(f"| {m['tag']['world_seed']}, {m['tag']['specialist_seed']} | {r['stage']}: {r['rule']} | {r['decision']} | "
                       f"{_f(r['fitted'], 4) if r['decision'] == 'fit' else '-'} | "
                       + (f"{_f(at.get('precision'))} [{_f(ci[0])}, {_f(ci[1])}]" if r["decision"] == "fit" and ci else "-")
                       + f" | {_f(held_p)} ({kept}) | {_f(held_auc)} |")
    if others:
        out += ["", "Rules left as they were (not in the table): " + ", ".join(f"{n} x {d}" for d, n in sorted(others.items()))
                + " (`unmeasured`: fewer than 5 right and 5 wrong labelled items; `keep`: no threshold reaches the target)."]
    return out + [""]


def cost_lines(res) -> list[str]:
    s, m = res.seconds, res.machine
    per_world = ", ".join(f"world seed {wr['world_seed']}: {wr['seconds']} s wall" for wr in res.worlds)
    return [f"CPU time of the whole benchmark: **{m.get('cpu_seconds')} CPU s** (this process and its workers, "
            f"`resource.getrusage`); wall {s.get('total')} s (CLIP {s.get('clip')} s, seeds {s.get('engine_and_measures')} s; "
            f"{per_world}) on {m.get('cpus')} CPUs, load average at the end {m.get('loadavg_at_end')} (measured under load: "
            "other processes share the machine, so wall seconds include their work; CPU seconds do not)."]


def query_lines(dump: str) -> list[str]:
    return ["Every figure above can be re-queried without rerunning, from the committed dump "
            f"(`{dump}`: one row per scored annotation of each dataset version: world_seed, specialist_seed, noise, version "
            "(`stage2`: every stage-1 annotation with its stage-2 status and reason; `vote_stage2`; `calibrated_stage2`), image, "
            "type, annotator, text, score, status, reason, correct (against the truth), checks (JSON)):", "",
            "```bash",
            f"python -c \"import duckdb; duckdb.sql(\\\"SELECT noise, type, status, count(*) n, avg(correct::int) share_right FROM '{dump}' WHERE version = 'stage2' GROUP BY ALL ORDER BY ALL\\\").show()\"",
            f"python -c \"import duckdb; duckdb.sql(\\\"SELECT noise, type, reason, sum(correct::int) right_, sum((NOT correct)::int) wrong FROM '{dump}' WHERE version = 'stage2' AND status = 'dropped' GROUP BY ALL ORDER BY ALL\\\").show()\"",
            "```", ""]


def markdown(res, summ: dict, rules: dict, plots: dict, dump: str) -> str:
    lines = [BEGIN, ""]
    if res.size == "small":
        lines += [SMOKE_BANNER, ""]
    lines += [f"Size `{res.size}`: world seeds {res.world_seeds} x specialist seeds {res.specialist_seeds} = "
              f"{len(res.world_seeds) * len(res.specialist_seeds)} runs per noise level, stages 1 + 2 on the held-out split "
              "(stage 3: the Stage 3 subsection). Cells: mean over runs [95% interval: hierarchical percentile bootstrap, "
              f"{res.resamples} resamples, runs resampled then held-out images within each run; box mAP: runs only]. "
              "F1 = 2PR/(P+R) per run. The oracle filter is a CONTROL that reads the truth (it drops exactly the wrong "
              "stage-1 annotations); the random drop keeps, per annotation type, as many stage-1 annotations as the filters kept.", ""]
    lines += ["### Label quality by dataset version (held-out split)", ""] + quality_tables(res, summ)
    lines += ["### CLIP scorer: held-out AUC per pair type and the rules switched off", ""] + clip_table(res) + [""]
    lines += ["### Per-rule ablation: what each filter rule removed", ""]
    for noise in summ:
        lines += fate_table(res, noise)
    lines += ["### Threshold sweep: every rule's ROC AUC and precision-recall curve", ""]
    for noise in summ:
        lines += rule_table(rules[noise], noise, plots)
    lines += ["### Calibration against a labelled sample (issue 19 item 4)", ""]
    for noise in summ:
        lines += calibration_table(res, noise, rules[noise])
    lines += ["### Query the dump", ""] + query_lines(dump)
    lines += ["### Cost", ""] + cost_lines(res) + ["", END]
    return "\n".join(lines)


def write_dump(res, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for wr in res.worlds for m in wr["measures"] for r in m["dump"]]
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")


def write_plots(rules: dict, folder: Path) -> dict:
    from engine.views.svg_plots import pr_curve_svg

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for noise, rows in rules.items():
        for r in rows:
            if not r["curve"]:
                continue
            a = r["at_threshold"]
            marks = [("current", a["recall"], a["precision"], "#d62728")] if a["precision"] is not None and a["recall"] is not None else []
            name = f"pr_{noise}_{r['stage']}_{r['rule']}".replace(":", "_").replace(" ", "_").replace(".", "_") + ".svg"
            svg = pr_curve_svg(f"{r['stage']}: {r['rule']} ({noise})", f"{r['value_of']}, n {r['n']}, AUC {_f(r['auc'])}", r["curve"], marks)
            (folder / name).write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))
            out[(noise, r["stage"], r["rule"])] = name
    return out


def _jsonable(res, summ, rules) -> dict:
    data = asdict(res)
    for wr in data["worlds"]:
        for m in wr["measures"]:
            m.pop("dump", None)
            m["counts"] = {k: np.asarray(v).sum(0).tolist() for k, v in m["counts"].items()}  # per-run sums (per image: the dump)
    data["summary"] = summ
    data["rules"] = {n: [{k: v for k, v in r.items() if k != "curve"} for r in rows] for n, rows in rules.items()}
    return data


def write_outputs(res, results_dir: Path, report: Path | None) -> list[Path]:
    """results.json, annotations.parquet, tables.md and pr_*.svg in results_dir; the tables into `report`."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    summ = summary(res)
    rules = {noise: rule_rows(res, noise) for noise in summ}
    plots = write_plots(rules, results_dir / "pr")
    plots = {k: f"pr/{v}" for k, v in plots.items()}
    dump = results_dir / "annotations.parquet"
    write_dump(res, dump)
    (results_dir / "results.json").write_text(json.dumps(_jsonable(res, summ, rules), indent=1, default=str))
    try:
        dump_rel = dump.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        dump_rel = str(dump)
    md = markdown(res, summ, rules, plots, dump_rel)
    (results_dir / "tables.md").write_text(md + "\n")
    written = [results_dir / "results.json", dump, results_dir / "tables.md", results_dir / "pr"]
    print(md)
    if report is not None:
        report = Path(report)
        rel = Path(os.path.relpath(results_dir, report.parent)).as_posix()
        block = markdown(res, summ, rules, {k: f"{rel}/{v}" for k, v in plots.items()}, dump_rel)
        text = report.read_text() if report.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        report.write_text(text)
        written.append(report)
    return written
