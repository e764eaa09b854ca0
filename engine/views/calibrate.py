"""`fld calibrate OUT`: how good every filter check and rule is, measured on the images of OUT that
carry `human` annotations (a COCO sample imported with the inputs), and a profile overlay with
thresholds fitted to a target precision.

1. Labels. Every machine annotation of those images gets `correct` True / False; human annotations
   are the truth and never enter the fit as predictions:
   - object regions: COCO-style greedy matching by score (a human box is matched once, so a
     duplicate is wrong) to a human object box of the same category (lower case, single spaces)
     with IoU >= 0.5 (schemas.geometry.box_iou_matrix);
   - OCR lines (kind text): the same against human text regions (COCO annotations with a
     `utf8_string`, COCO-Text style): quad IoU >= 0.5 (pycocotools on the rasterised quads) and
     the same text (case and spaces ignored);
   - groundings: the phrase names a human category (whole word, plural `s` allowed) and the box
     has IoU >= 0.5 with a human box of that category; a phrase naming none is not labelled;
   - captions, on images with human captions: mention-level agreement: the caption's mentions
     (spaCy nouns that are not compound modifiers, lemmatised: the objects of schemas.text_stats)
     are compared with those of the human captions and categories; correct when at least half of
     them are mentioned by a human too (a caption that mentions nothing is wrong).
2. Figures, each with the number of labelled items behind it:
   - per check (every `checks` key, and `score`): ROC AUC of the value against correctness
     (Mann-Whitney ranks), with a percentile bootstrap interval (resampling annotations);
   - per rule (each filter's `thresholds()`: the numeric rules, on the value they read, in their
     direction): AUC, precision / recall / F1 of the rule's own keep decision at the current
     threshold, and the threshold that reaches the target precision with the most recall;
   - per drop reason: how many labelled annotations it dropped and how many of those were right.
3. The overlay (`write_overlay`): a profile file for `fld run --profile FILE` that extends the
   profile of the run, with the fitted thresholds, and rules whose AUC interval includes 0.5 (or lies
   below it) switched off; each line carries its figures as a comment.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from engine.ingest.human import HUMAN
from schemas.geometry import box_iou_matrix, box_to_quad

MATCH_IOU = 0.5
DEFAULT_TARGET = 0.9
DEFAULT_BOOTSTRAP = 1000
DEFAULT_MIN_LABELS = 5  # a rule is measured (fitted or switched off) with at least this many correct AND wrong items
CONFIDENCE = 0.95


def is_human(ann: dict) -> bool:
    return (ann.get("source") or {}).get("annotator") == HUMAN


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


# ------------------------------------------------------------------------------------------ labels
@dataclass
class Item:
    """One labelled machine annotation."""

    type: str  # texts | regions | groundings
    ann: dict
    correct: bool

    def value(self, key: str) -> float | None:
        if key == "score":
            v = self.ann.get("score")
        else:
            v = (self.ann.get("checks") or {}).get(key)
        return None if v is None or not math.isfinite(float(v)) else float(v)


def _rank(ann: dict) -> tuple[float, str]:
    score = ann.get("score")
    return (-(1.0 if score is None else float(score)), ann.get("ann_id") or "")


def _greedy(preds: list[dict], truths: list[dict], iou: np.ndarray, same) -> list[bool]:
    """COCO-style: predictions by score, each takes the best unmatched truth with IoU >= 0.5 that `same` accepts."""
    order = sorted(range(len(preds)), key=lambda i: _rank(preds[i]))
    taken: set[int] = set()
    out = [False] * len(preds)
    for i in order:
        best, best_iou = None, MATCH_IOU
        for j, t in enumerate(truths):
            if j not in taken and iou[i, j] >= best_iou and same(preds[i], t):
                best, best_iou = j, iou[i, j]
        if best is not None:
            taken.add(best)
            out[i] = True
    return out


def quad_iou_matrix(a: list[list[float]], b: list[list[float]], width: int, height: int) -> np.ndarray:
    """IoU of (possibly rotated) quads, rasterised by pycocotools at the image's size."""
    from pycocotools import mask as mask_utils

    if not a or not b:
        return np.zeros((len(a), len(b)))
    ra = mask_utils.frPyObjects([list(map(float, q)) for q in a], height, width)
    rb = mask_utils.frPyObjects([list(map(float, q)) for q in b], height, width)
    return np.asarray(mask_utils.iou(ra, rb, [0] * len(b)), dtype=float).reshape(len(a), len(b))


def _quad(region: dict) -> list[float]:
    return list(region.get("quad") or box_to_quad(region["box"]))


def _names_category(phrase: str, category: str) -> bool:
    return bool(category) and re.search(rf"\b{re.escape(category)}(e?s)?\b", phrase) is not None


def label_record(rec: dict, mentions_of=None) -> list[Item]:
    """The labelled machine annotations of one image record (empty without human annotations)."""
    regions = rec.get("regions") or []
    # human annotations are the truth whatever a filter said about them
    human_objects = [r for r in regions if is_human(r) and r.get("kind") == "object"]
    human_lines = [r for r in regions if is_human(r) and r.get("kind") == "text"]
    items: list[Item] = []
    if human_objects:
        preds = [r for r in regions if not is_human(r) and r.get("kind") == "object"]
        iou = box_iou_matrix([p["box"] for p in preds], [t["box"] for t in human_objects])
        ok = _greedy(preds, human_objects, iou, lambda p, t: _norm(p.get("label")) == _norm(t.get("label")))
        items += [Item("regions", p, c) for p, c in zip(preds, ok)]
        cats = {_norm(t.get("label")) for t in human_objects}
        for g in rec.get("groundings") or []:
            if is_human(g):
                continue
            phrase = _norm(g.get("phrase"))
            named = [t for t in human_objects if _names_category(phrase, _norm(t.get("label")))]
            if not named or not any(_names_category(phrase, c) for c in cats):
                continue
            best = box_iou_matrix([g["box"]], [t["box"] for t in named]).max()
            items.append(Item("groundings", g, bool(best >= MATCH_IOU)))
    if human_lines:
        preds = [r for r in regions if not is_human(r) and r.get("kind") == "text"]
        iou = quad_iou_matrix([_quad(p) for p in preds], [_quad(t) for t in human_lines], rec["width"], rec["height"])
        ok = _greedy(preds, human_lines, iou, lambda p, t: _norm(p.get("label")) == _norm(t.get("label")))
        items += [Item("regions", p, c) for p, c in zip(preds, ok)]
    texts = rec.get("texts") or []
    human_captions = [t["text"] for t in texts if is_human(t) and (t.get("text") or "").strip()]
    machine = [t for t in texts if not is_human(t)]
    if human_captions and machine and mentions_of is not None:
        truth: set[str] = set()
        for m in mentions_of(human_captions):
            truth |= m
        truth |= {w for r in human_objects for w in _norm(r.get("label")).split()}
        for t, m in zip(machine, mentions_of([t.get("text") or "" for t in machine])):
            items.append(Item("texts", t, bool(m) and len(m & truth) >= 0.5 * len(m)))
    return items


def spacy_mentions():
    """texts -> per text, the lemmas of its objects (schemas.text_stats: nouns that are not compound modifiers)."""
    from engine.models import load_spacy
    from schemas.text_stats import OBJECT_POS

    nlp = load_spacy()

    def mentions(texts: list[str]) -> list[set[str]]:
        return [{t.lemma_.lower() for t in doc if t.pos_ in OBJECT_POS and t.dep_ != "compound"} for doc in nlp.pipe(texts)]

    return mentions


def human_records(store, step: str | None = None) -> list[dict]:
    """Records of the step (default: the latest) whose images carry human regions or captions."""
    from engine.views.query import open_views

    con = open_views(store, step)
    try:
        cur = con.execute(
            "SELECT image_id, width, height, texts, regions, groundings FROM records "
            "WHERE len(list_filter(regions, lambda a: a.source.annotator = 'human')) > 0 "
            "OR len(list_filter(texts, lambda a: a.source.annotator = 'human')) > 0 ORDER BY image_id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        con.close()


def labelled_items(records: Iterable[dict]) -> list[Item]:
    records = list(records)
    needs_text = any(is_human(t) for r in records for t in r.get("texts") or [])
    mentions = spacy_mentions() if needs_text else None
    return [item for rec in records for item in label_record(rec, mentions)]


# ------------------------------------------------------------------------------------------ figures
def auc(values: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC of `values` for `labels` (True = correct), Mann-Whitney with mid-ranks for ties; None for one class."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return None
    ranks = rankdata(values)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def auc_interval(values: np.ndarray, labels: np.ndarray, resamples: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval (CONFIDENCE) of the AUC, resampling items; resamples of one class skipped."""
    from scipy.stats import rankdata

    values, labels = np.asarray(values, float), np.asarray(labels, bool)
    n = len(values)
    if auc(values, labels) is None or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    out = []
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        v, y = values[idx], labels[idx]
        ranks = rankdata(v, axis=1)
        pos = y.sum(axis=1)
        neg = n - pos
        ok = (pos > 0) & (neg > 0)
        a = ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2)[ok] / (pos * neg)[ok]
        out.append(a)
        done += b
    a = np.concatenate(out)
    if not len(a):
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(a, tail)), float(np.percentile(a, 100 - tail))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def prf(keep: np.ndarray, labels: np.ndarray) -> dict:
    """Precision / recall / F1 of a keep decision, with the counts behind them."""
    keep, labels = np.asarray(keep, bool), np.asarray(labels, bool)
    tp, kept, pos = int((keep & labels).sum()), int(keep.sum()), int(labels.sum())
    p = tp / kept if kept else None
    r = tp / pos if pos else None
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "kept": kept, "tp": tp, "precision_ci": wilson(tp, kept)}


def pr_curve(values: np.ndarray, labels: np.ndarray, upper: bool = False) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) of the keep rule `value >= t` (upper: `value <= t`) at every distinct value,
    from the strictest to the loosest."""
    values, labels = np.asarray(values, float), np.asarray(labels, bool)
    s = -values if upper else values
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], labels[order]
    tp = np.cumsum(y_sorted)
    kept = np.arange(1, len(s) + 1)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # the last index of each distinct value
    pos = max(int(labels.sum()), 1)
    return [(float(-v if upper else v), float(t / k), float(t / pos)) for v, t, k in zip(s_sorted[last], tp[last], kept[last])]


def fit_threshold(values: np.ndarray, labels: np.ndarray, target: float, upper: bool = False) -> float | None:
    """The threshold whose keep set reaches precision >= target with the most recall (None: none does).

    Put halfway between the last value kept and the next one, so it sits between the classes a
    check separates; when the rule keeps everything, it is the loosest value itself."""
    curve = pr_curve(values, labels, upper)
    best = None
    for i, (t, p, r) in enumerate(curve):
        if p >= target and (best is None or r > curve[best][2]):
            best = i
    if best is None:
        return None
    t = curve[best][0]
    if best + 1 < len(curve):
        t = (t + curve[best + 1][0]) / 2
    return float(t)


# --------------------------------------------------------------------------------------- the rules
@dataclass
class Rule:
    stage: str
    threshold: Any  # filters.decision.Threshold
    current_param: Any  # the stage parameter's current value (top level), for the overlay
    nullable: bool


def pipeline_rules(config: dict | None) -> list[Rule]:
    """Every numeric rule of the pipeline config (manifest `pipeline.config`), with its stage and param."""
    from pydantic import ValidationError

    from engine.registry import UnknownStageError, stage_class

    out: list[Rule] = []
    seen: set[tuple] = set()
    for step in (config or {}).get("steps", []):
        for spec in step.get("stages", []):
            try:
                cls = stage_class(spec["stage"])
                if not hasattr(cls, "thresholds"):
                    continue
                stage = cls(spec.get("params") or {})
            except (UnknownStageError, ValidationError, ImportError):
                continue
            dumped = stage.params.model_dump(mode="json")
            for t in stage.thresholds():
                key = (spec["stage"], t.rule)
                if key in seen or not t.param:
                    continue
                seen.add(key)
                out.append(Rule(spec["stage"], t, dumped.get(t.param[0]), _nullable(cls, dumped, t.param)))
    return out


def _leaf(value: Any, path: tuple) -> Any:
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _set_path(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    value = json.loads(json.dumps(value))
    node = value
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return value


def _nullable(cls, dumped: dict, path: tuple) -> bool:
    from pydantic import ValidationError

    try:
        cls.Params(**{**dumped, path[0]: _set_path(dumped[path[0]], path[1:], None)})
        return True
    except ValidationError:
        return False


@dataclass
class Calibration:
    target: float
    images: int
    labelled: dict[str, dict[str, int]]  # type -> {n, correct}
    checks: list[dict] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)
    drops: list[dict] = field(default_factory=list)


def _in_scope(item: Item, t) -> bool:
    return item.type == t.annotations and (t.where is None or item.ann.get(t.where[0]) == t.where[1])


def measure_rule(values: np.ndarray, labels: np.ndarray, current: float, upper: bool, target: float,
                 resamples: int = DEFAULT_BOOTSTRAP, min_labels: int = DEFAULT_MIN_LABELS) -> dict:
    """Every figure of one rule over its labelled values, and what the overlay does with it."""
    oriented = -values if upper else values
    a = auc(oriented, labels)
    ci = auc_interval(oriented, labels, resamples) if a is not None else None
    keep_now = values <= current if upper else values >= current
    now = prf(keep_now, labels)
    fitted = fit_threshold(values, labels, target, upper) if len(values) else None
    then = prf(values <= fitted if upper else values >= fitted, labels) if fitted is not None else None
    if ci is None or min(int(labels.sum()), int((~labels).sum())) < min_labels:
        decision, why = "unmeasured", f"too few labels (needs {min_labels} correct and {min_labels} wrong items)"
    elif np.ptp(values) == 0:
        decision, why = "unmeasured", "the value is the same on every labelled item"
    elif ci[0] <= 0.5:
        decision = "off"
        why = "AUC interval includes 0.5: no better than chance" if ci[1] >= 0.5 else "AUC interval below 0.5: keeps the wrong ones"
    elif fitted is None:
        decision, why = "keep", f"no threshold reaches precision {target}"
    else:
        decision, why = "fit", f"precision {target} reached"
    return {"n": int(len(values)), "correct": int(labels.sum()), "auc": a, "auc_ci": ci, "current": current,
            "now": now, "fitted": fitted, "at_fitted": then, "decision": decision, "why": why}


def calibrate(store, step: str | None = None, target: float = DEFAULT_TARGET,
              resamples: int = DEFAULT_BOOTSTRAP, records: list[dict] | None = None,
              config: dict | None = None, min_labels: int = DEFAULT_MIN_LABELS) -> Calibration:
    """The figures of every check, rule and drop reason of OUT's step against its human annotations."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"--target-precision must be in (0, 1], got {target}")
    if records is None:
        records = human_records(store, step)
    if config is None:
        config = (store.read_manifest().get("pipeline") or {}).get("config")
    items = labelled_items(records)
    cal = Calibration(target, len(records), {})
    for item in items:
        c = cal.labelled.setdefault(item.type, {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(item.correct)
    # checks (and score), per annotation type
    for typ in sorted({i.type for i in items}):
        of_type = [i for i in items if i.type == typ]
        keys = sorted({k for i in of_type for k in (i.ann.get("checks") or {})}) + ["score"]
        for key in keys:
            pairs = [(v, i.correct) for i in of_type if (v := i.value(key)) is not None]
            if not pairs:
                continue
            v, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], bool)
            a = auc(v, y)
            cal.checks.append({"type": typ, "check": key, "n": len(v), "correct": int(y.sum()), "auc": a,
                               "auc_ci": auc_interval(v, y, resamples) if a is not None else None})
    for rule in pipeline_rules(config):
        t = rule.threshold
        pairs = [(v, i.correct) for i in items if _in_scope(i, t) and (v := i.value(t.value_of)) is not None]
        v, y = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], bool)
        row = {"stage": rule.stage, "rule": t.rule, "type": t.annotations, "value_of": t.value_of,
               "keeps": "<=" if t.upper else ">=", "param": list(t.param), "nullable": rule.nullable,
               "current_param": rule.current_param, **measure_rule(v, y, t.value, t.upper, target, resamples, min_labels)}
        row["curve"] = pr_curve(v, y, t.upper) if len(v) and y.any() else []
        cal.rules.append(row)
    by_reason: dict[tuple[str, str], list[bool]] = {}
    for i in items:
        if i.ann.get("status") == "dropped":
            by_reason.setdefault((i.type, i.ann.get("reason") or "(none)"), []).append(i.correct)
    cal.drops = [{"type": typ, "reason": reason, "dropped": len(c), "of_them_correct": sum(c)}
                 for (typ, reason), c in sorted(by_reason.items())]
    return cal


# ------------------------------------------------------------------------------------------ output
def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def tables(cal: Calibration) -> dict[str, dict]:
    """The figures as titled tables (what `fld calibrate` and `fld stats` print; JSON keeps the numbers)."""
    pct = int(CONFIDENCE * 100)
    labelled = {"title": f"calibration: labelled machine annotations on {cal.images} images with human annotations",
                "columns": ["type", "labelled", "correct"],
                "rows": [[t, c["n"], c["correct"]] for t, c in sorted(cal.labelled.items())]}
    checks = {"title": f"calibration: ROC AUC of every check against correctness ({pct}% bootstrap interval)",
              "columns": ["type", "check", "n", "correct", "AUC", "interval"],
              "rows": [[c["type"], c["check"], c["n"], c["correct"], _f(c["auc"]), _ci(c["auc_ci"])] for c in cal.checks]}
    rules = {"title": f"calibration: rules at their current and fitted threshold (target precision {cal.target})",
             "columns": ["stage", "rule", "keeps", "n", "correct", "AUC", "interval", "now", "P / R / F1 now",
                         "fitted", "P / R / F1 fitted", "overlay"],
             "rows": []}
    for r in cal.rules:
        now, then = r["now"], r["at_fitted"]
        rules["rows"].append([
            r["stage"], r["rule"], f"{r['value_of']} {r['keeps']}", r["n"], r["correct"], _f(r["auc"]), _ci(r["auc_ci"]),
            _f(r["current"], 4), f"{_f(now['precision'])} / {_f(now['recall'])} / {_f(now['f1'])}",
            _f(r["fitted"], 4), f"{_f(then['precision'])} / {_f(then['recall'])} / {_f(then['f1'])}" if then else "-",
            r["decision"]])
    drops = {"title": "calibration: labelled annotations each drop reason removed, and how many of them were correct",
             "columns": ["type", "reason", "dropped", "of them correct"],
             "rows": [[d["type"], d["reason"], d["dropped"], d["of_them_correct"]] for d in cal.drops]}
    out = {"calibration": labelled, "calibration_checks": checks, "calibration_rules": rules, "calibration_drops": drops}
    return {k: t for k, t in out.items() if t["rows"]}


def as_json(cal: Calibration) -> dict:
    """The numbers (no curves), for `fld stats --format json` and `fld calibrate --format json`."""
    return {"target_precision": cal.target, "images": cal.images, "labelled": cal.labelled, "checks": cal.checks,
            "rules": [{k: v for k, v in r.items() if k != "curve"} for r in cal.rules], "drops": cal.drops}


def _comment(r: dict) -> str:
    now, then = r["now"], r["at_fitted"]
    parts = [f"{r['decision']}: {r['why']}", f"n {r['n']} ({r['correct']} correct)",
             f"AUC {_f(r['auc'])} {_ci(r['auc_ci'])}",
             f"now {_f(r['current'], 4)}: P {_f(now['precision'])} R {_f(now['recall'])} F1 {_f(now['f1'])}"]
    if then:
        parts.append(f"fitted {_f(r['fitted'], 4)}: P {_f(then['precision'])} {_ci(then['precision_ci'])} "
                     f"R {_f(then['recall'])} F1 {_f(then['f1'])}")
    return "; ".join(parts)


def overlay(cal: Calibration) -> tuple[dict, dict]:
    """(params, comments): the overlay's `params:` (stage -> param -> full value) and a comment per leaf path."""
    params: dict[str, dict] = {}
    comments: dict[tuple, str] = {}
    for r in cal.rules:
        if r["decision"] == "fit":
            new = round(r["fitted"], 6)
            if isinstance(_leaf(r["current_param"], r["param"][1:]), int):  # an integer parameter (min_sources)
                new = math.floor(new) if r["keeps"] == "<=" else math.ceil(new)
        elif r["decision"] == "off":
            new = None if r["nullable"] else (0.0 if r["keeps"] == ">=" else None)
            if new is None and not r["nullable"]:
                comments[(r["stage"], *r["param"])] = "unchanged (cannot be switched off); " + _comment(r)
                continue
        else:
            comments[(r["stage"], *r["param"])] = "unchanged; " + _comment(r)
            continue
        stage = params.setdefault(r["stage"], {})
        top = r["param"][0]
        base = stage.get(top, r["current_param"])
        stage[top] = _set_path(base, tuple(r["param"][1:]), new)
        comments[(r["stage"], *r["param"])] = _comment(r)
    # rules left unchanged are shown only where their parameter is written anyway
    return params, comments


def _emit(node: dict, path: tuple, comments: dict, indent: int, lines: list[str]) -> None:
    for key, value in node.items():
        here = (*path, key)
        pad = "  " * indent
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            _emit(value, here, comments, indent + 1, lines)
        else:
            note = comments.get(here)
            lines.append(f"{pad}{key}: {json.dumps(value)}" + (f"  # {note}" if note else ""))


def overlay_yaml(cal: Calibration, extends: str | None, source: str) -> str:
    """The profile overlay as YAML text (engine.config.load_profile_file reads it)."""
    params, comments = overlay(cal)
    lines = [f"# written by fld calibrate {source} (target precision {cal.target}; {cal.images} images with human",
             "# annotations). Use it with: fld run ... --profile THIS_FILE --from <first filter step>",
             "# Each rule: what was done and why, n labelled (correct), ROC AUC [95% bootstrap interval],",
             "# precision / recall / F1 at the current and at the fitted threshold.",
             f"extends: {json.dumps(extends)}",
             f"description: {json.dumps(f'calibrated on {source} for precision {cal.target}')}"]
    lines.append("params:" if params else "params: {}")
    _emit(params, (), comments, 1, lines)
    untouched = [(p, c) for p, c in comments.items() if p[0] not in params or p[1] not in params[p[0]]]
    if untouched:
        lines.append("# rules left as they are:")
        lines += [f"#   {'.'.join(map(str, p))}: {c}" for p, c in untouched]
    return "\n".join(lines) + "\n"


def calibration_sections(store, step: str | None = None) -> dict[str, dict]:
    """`fld stats` sections when OUT's step has images with human annotations (else none): the tables of
    `fld calibrate` at its defaults; the `calibration` table carries every number under `figures` (JSON)."""
    records = human_records(store, step)
    if not records:
        return {}
    cal = calibrate(store, step, records=records)
    out = tables(cal)
    if "calibration" in out:
        out["calibration"]["figures"] = as_json(cal)
    return out


def calibration_html(store, step: str | None = None) -> str:
    """`fld show`'s section: a precision-recall curve per measured rule, the current threshold (orange) and
    the fitted one (green) marked; empty when OUT has no human annotations."""
    from html import escape

    from engine.views.svg_plots import THRESHOLD_COLOR, pr_curve_svg

    records = human_records(store, step)
    if not records:
        return ""
    cal = calibrate(store, step, records=records)
    figures = []
    for r in cal.rules:
        if not r["curve"]:
            continue
        marks = []
        for label, at, colour in (("current", r["now"], THRESHOLD_COLOR), ("fitted", r["at_fitted"], "#2e8b57")):
            if at and at["precision"] is not None and at["recall"] is not None:
                marks.append((f"{label} {r['current'] if label == 'current' else r['fitted']:.4g}", at["recall"],
                              at["precision"], colour))
        sub = f"n {r['n']} ({r['correct']} correct), AUC {_f(r['auc'])} {_ci(r['auc_ci'])}: {r['decision']}"
        plot = pr_curve_svg(f"{r['stage']} {r['rule']}", sub, r["curve"], marks)
        figures.append(f"<figure class='pr'>{plot}<figcaption>{escape(_comment(r))}</figcaption></figure>")
    return ("<section id='calibration'><h2>Calibration against the human annotations</h2><p>Precision-recall "
            f"curve of each rule over {cal.images} images with human annotations (fld calibrate); orange circle: "
            f"the current threshold, green: the threshold fitted to precision {cal.target}.</p>"
            + ("".join(figures) or "<p>No rule has labelled items with both outcomes.</p>") + "</section>")
