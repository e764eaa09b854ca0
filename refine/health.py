"""The round's health check: what a round's model can do, measured on its validation images, before
its labels may enter the dataset (docs/refine.md).

Why: a model trained from random weights with a bad recipe collapses to one output (the decoder
learns the label distribution without looking at the image: the same caption for every image and
every task prompt) while its training loss still falls. Such a model must not relabel the dataset.

Figures (per trained task, on the validation images the trainer held out and never trained on;
greedy decoding without an n-gram ban, one example per image and task):
- `distinct`: (distinct generations - 1) / (distinct targets - 1) across the validation images:
  1 when the model says something different wherever the labels differ, 0 for a collapse (one
  output for every image). None when the targets themselves do not differ.
- `same_across_tasks`: share of (image, pair of task prompts) whose generations are equal although
  their targets differ (an `<OD>` prompt answered with a caption).
- `parse_rate`: share of generations of a box / quad task (OD, dense region captions, region
  proposals, OCR with regions, phrase grounding) that the processor decodes into at least one sound
  instance (`sound`: no zero-area or sub-pixel box, no loc-token debris as label, repeats counted once).
- agreement with the image's kept labels: `box_recall` / `box_precision` of `<OD>` at IoU 0.5 with
  the same category, and `mention_precision` of captions: the share of a generated caption's
  content words found in the image's kept labels (captions and region labels), and `mention_lift`:
  that precision minus the same caption's against the next validation image's labels (a control:
  a generic caption that fits any image scores about 0).

`verdict` compares the figures with `HealthThresholds` (the `refine.health` block); the trainer
stores the figures in the round's training summary, the relabel stage applies the thresholds, so
new thresholds need no new training figures.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from pydantic import ConfigDict, Field

from engine.values import BoundedModel
from schemas.florence2_tasks import BY_TOKEN

IOU = 0.5
_WORD = re.compile(r"[a-z0-9]+")
# words that say nothing about the image's content (articles, prepositions, the caption's frame)
STOPWORDS = frozenset(
    "a an the of on in at to and or with is are there this that image picture photo shows showing its it by "
    "from for as be has have which while near next one two three".split()
)
BOX_TASKS = ("<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<OCR_WITH_REGION>", "<CAPTION_TO_PHRASE_GROUNDING>")


class HealthThresholds(BoundedModel):  # finite numbers, 64-bit integers ("nan" refused)
    """The `refine.health` block: a round whose model misses one of these does not merge (its relabels
    are kept in the round's shards as dropped, reason `round:unhealthy_model`). `null` turns a check off."""

    model_config = ConfigDict(extra="forbid")

    min_distinct: float | None = Field(
        0.3, ge=0, le=1, description="per task, (distinct generations - 1) / (distinct targets - 1) on the validation "
        "images; a collapsed model (one output for every image) scores 0")
    max_same_across_tasks: float | None = Field(
        0.5, ge=0, le=1, description="share of (image, task pair) whose generations are equal while their targets "
        "differ (an <OD> prompt answered with a caption)")
    min_parse_rate: float | None = Field(
        0.5, ge=0, le=1, description="per box / quad task, share of generations that decode to at least one instance")
    min_box_recall: float | None = Field(
        None, ge=0, le=1, description="<OD> recall at IoU 0.5, same category, against the kept boxes of the validation "
        "images (fails only the <OD> relabels). Default: 0.1 when the round's weights descend from trained weights "
        "(refine.model not random:), since a detector that finds fewer than 1 in 10 of the kept boxes on images it "
        "did not train on has not learnt to detect and its boxes are noise (measured: 0.000 for the benchmark's "
        "pretrained tiny model, against 0.8 for the noisy labels themselves vs truth), and kept labels are noisy and "
        "need the same category name, so a stricter value would refuse a useful model. Off (null) from random "
        "weights: a small model trained from scratch on a few hundred noisy images does not generalise to unseen "
        "images (measured: held-out recall 0.05) yet relabels the images it trained on")
    min_box_precision: float | None = Field(None, ge=0, le=1, description="<OD> precision at IoU 0.5 (off by default: "
                                            "the kept labels miss objects, so a good model's extra boxes count as wrong)")
    min_mention_precision: float | None = Field(
        None, ge=0, le=1, description="per caption task, share of a generated caption's content words found in the "
        "image's kept labels (fails only that caption task's relabels). Default: 0.3 when the round's weights descend "
        "from trained weights: below it, most of what the caption says is in none of the image's labels (a caption "
        "of another image, or invented objects; measured 0.53 for the benchmark's pretrained model on its own "
        "validation images); off (null) from random weights, as min_box_recall")
    min_mention_lift: float | None = Field(
        None, ge=-1, le=1, description="per caption task, mention precision against the image's own kept labels minus "
        "that of the same caption against another validation image's labels (the control): what the caption says "
        "about this image rather than about any image. Default: 0.1 when the round's weights descend from trained "
        "weights, because word overlap alone passes generic captions: the stage-3 benchmark measured the pretrained "
        "tiny model's captions at mention precision 0.31-0.48 against the kept labels (above 0.3) while their object "
        "mentions were 0.09-0.18 right against the truth, and merging them lowered the dataset's caption precision; "
        "a generic caption scores about 0 here. Off (null) from random weights, as min_box_recall")
    min_images: int = Field(2, ge=0, description="fewer validation images than this: the round is not checked "
                            "(reported as unchecked), since one image cannot show a collapse")

    def for_start(self, from_random: bool) -> "HealthThresholds":
        """The thresholds of a round whose weights descend from `random:` (as configured) or from trained
        weights (the agreement checks the config leaves unset are switched on: PRETRAINED_DEFAULTS)."""
        if from_random:
            return self
        return self.model_copy(update={k: v for k, v in PRETRAINED_DEFAULTS.items() if k not in self.model_fields_set})


# agreement checks on by default when a round starts from trained weights (HealthThresholds' descriptions say why)
PRETRAINED_DEFAULTS = {"min_box_recall": 0.1, "min_mention_precision": 0.3, "min_mention_lift": 0.1}


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def _instances(answer) -> list[tuple[str, list[float]]]:
    """(label, box) of a parsed answer (boxes, or quads as their bounding boxes)."""
    if not isinstance(answer, dict):
        return []
    if answer.get("quad_boxes") is not None:
        out = []
        for q, label in zip(answer["quad_boxes"], answer.get("labels") or []):
            xs, ys = q[0::2], q[1::2]
            out.append((label, [min(xs), min(ys), max(xs), max(ys)]))
        return out
    boxes = answer.get("bboxes") or []
    labels = answer.get("labels") or [""] * len(boxes)
    return list(zip(labels, boxes))


MIN_SIDE = 1.0  # pixels: a box narrower or lower than one pixel is no object


def sound(instances: list[tuple[str, list[float]]], size: tuple[int, int]) -> list[tuple[str, list[float]]]:
    """The instances a parse rate may count: each box clamped into the image, at least MIN_SIDE pixels
    wide and high (a zero-area box is what `<loc_k>` repeated four times decodes to; two neighbouring
    loc tokens give a sub-pixel box), a label that is not loc-token debris, each (label, box) once (a
    generation loop repeats one instance)."""
    from annotators.florence2 import is_token_debris
    from schemas.geometry import clamp_points

    w, h = size
    out, seen = [], set()
    for label, box in instances:
        x0, y0, x1, y1 = clamp_points(box, w, h)
        key = (_label(label), round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3))
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE or is_token_debris(label or "") or key in seen:
            continue
        seen.add(key)
        out.append((label, [x0, y0, x1, y1]))
    return out


def _label(text: str) -> str:
    return " ".join(_WORD.findall((text or "").lower()))


def box_agreement(predicted: list[tuple[str, list[float]]], kept: list[tuple[str, list[float]]]) -> tuple[int, int, int]:
    """(matched, predicted, kept): one-to-one matches at IoU >= 0.5 between boxes of the same label."""
    from refine.metrics import match_boxes

    matched = 0
    for label in {_label(lab) for lab, _ in kept}:
        a = [b for lab, b in predicted if _label(lab) == label]
        b = [b for lab, b in kept if _label(lab) == label]
        matched += sum(1 for _, _, iou in match_boxes(a, b) if iou >= IOU)
    return matched, len(predicted), len(kept)


def check_model(florence, examples: Iterable, images: dict, max_new_tokens: dict[str, int] | None = None,
                batch_size: int = 8) -> dict:
    """The health figures of a Florence2Model (annotators.florence2_model) on validation examples
    (schemas.task_codec.Example; the first example of each (image, task) is used) and their images
    (image_id -> PIL image). Returns the figures plus `generations` (a few, to look at)."""
    first: dict[tuple[str, str], object] = {}
    for ex in examples:
        first.setdefault((ex.image_id, ex.task), ex)
    by_task: dict[str, list] = defaultdict(list)
    for (_, task), ex in first.items():
        by_task[task].append(ex)
    words_of: dict[str, set[str]] = defaultdict(set)  # image -> words of its kept labels (every task's target)
    for ex in first.values():
        words_of[ex.image_id].update(_words(re.sub(r"<[^>]+>", " ", ex.target)))
    generated: dict[tuple[str, str], str] = {}
    for task, exs in by_task.items():
        limit = (max_new_tokens or {}).get(task, 256)
        for start in range(0, len(exs), batch_size):
            chunk = exs[start:start + batch_size]
            inputs = [ex.text_input or None for ex in chunk] if BY_TOKEN[task].takes_input else None
            texts = florence.generate([images[ex.image_id] for ex in chunk], task, inputs, max_new_tokens=limit,
                                      num_beams=1, no_repeat_ngram_size=0)
            for ex, text in zip(chunk, texts):
                generated[(ex.image_id, task)] = text.replace("</s>", "").replace("<s>", "").strip()
    tasks: dict[str, dict] = {}
    boxes = [0, 0, 0]
    mentions = [0, 0]
    lift = [0, 0]
    for task, exs in sorted(by_task.items()):
        gens = [generated[(ex.image_id, task)] for ex in exs]
        targets = {ex.target for ex in exs}
        fig: dict = {"examples": len(exs), "distinct_generations": len(set(gens)), "distinct_targets": len(targets),
                     "distinct": (min(1.0, (len(set(gens)) - 1) / (len(targets) - 1)) if len(targets) > 1 else None)}
        if task in BOX_TASKS:
            parsed = 0
            for ex in exs:
                img = images[ex.image_id]
                answer = florence.parse(generated[(ex.image_id, task)], task, img.size)[task]
                found = sound(_instances(answer), img.size)
                parsed += bool(found)
                if task == "<OD>":
                    truth = _instances(florence.parse(ex.target, task, img.size)[task])
                    for k, v in enumerate(box_agreement(found, truth)):
                        boxes[k] += v
            fig["parse_rate"] = parsed / len(exs)
            if task == "<OD>":
                fig["box_recall"] = boxes[0] / boxes[2] if boxes[2] else None
                fig["box_precision"] = boxes[0] / boxes[1] if boxes[1] else (0.0 if boxes[2] else None)
        elif BY_TOKEN[task].tier is not None:
            said = found = elsewhere = 0
            for j, ex in enumerate(exs):
                ws = _words(generated[(ex.image_id, task)])
                found += sum(w in words_of[ex.image_id] for w in ws)
                said += len(ws)
                # the control: the same caption against the next validation image's labels
                other = exs[(j + 1) % len(exs)].image_id
                elsewhere += sum(w in words_of[other] for w in ws)
            mentions[0] += found
            mentions[1] += said
            fig["mention_precision"] = found / said if said else None
            if said and len(exs) > 1:
                fig["mention_lift"] = (found - elsewhere) / said
                lift[0] += found - elsewhere
                lift[1] += said
        tasks[task] = fig
    # the same answer to two prompts of one image whose labels differ
    same = pairs = 0
    per_image: dict[str, list] = defaultdict(list)
    for (iid, task), ex in first.items():
        if not BY_TOKEN[task].takes_input:
            per_image[iid].append(ex)
    for exs in per_image.values():
        for i, a in enumerate(exs):
            for b in exs[i + 1:]:
                if a.target != b.target:
                    pairs += 1
                    same += generated[(a.image_id, a.task)] == generated[(b.image_id, b.task)]
    shown = {}
    for (iid, task), text in sorted(generated.items()):
        if len({i for i, _ in shown}) < 2 or iid in {i for i, _ in shown}:
            shown.setdefault((iid, task), text[:200])
    return {
        "checked": True,
        "images": len({iid for iid, _ in first}),
        "tasks": tasks,
        "same_across_tasks": same / pairs if pairs else None,
        "box_recall": boxes[0] / boxes[2] if boxes[2] else None,
        "box_precision": boxes[0] / boxes[1] if boxes[1] else (0.0 if boxes[2] else None),
        "mention_precision": mentions[0] / mentions[1] if mentions[1] else None,
        "mention_lift": lift[0] / lift[1] if lift[1] else None,
        "generations": [{"image_id": iid[:12], "task": task, "text": text} for (iid, task), text in shown.items()],
    }


def unchecked(images: int) -> dict:
    return {"checked": False, "images": images}


MODEL = "model"  # the scope of a model-wide failure (every task's relabels dropped); else a task token


def failures(figures: dict | None, t: HealthThresholds) -> dict[str, list[str]]:
    """The failed checks by scope, each as `name value < threshold`: a task token (only that task's relabels
    are dropped: a model can caption well and read no text) or MODEL (the whole round: the same answer to
    different prompts, or every task collapsed). Empty: healthy or unchecked."""
    if not figures or not figures.get("checked") or figures.get("images", 0) < t.min_images:
        return {}
    out: dict[str, list[str]] = defaultdict(list)
    tasks = figures.get("tasks") or {}
    collapsed = 0
    for task, fig in sorted(tasks.items()):
        if t.min_distinct is not None and fig.get("distinct") is not None and fig["distinct"] < t.min_distinct:
            collapsed += 1
            out[task].append(f"{task} distinct generations {fig['distinct']:.2f} < {t.min_distinct} "
                             f"({fig['distinct_generations']} for {fig['distinct_targets']} different labels)")
        if t.min_parse_rate is not None and fig.get("parse_rate") is not None and fig["parse_rate"] < t.min_parse_rate:
            out[task].append(f"{task} parse rate {fig['parse_rate']:.2f} < {t.min_parse_rate}")
        for key, name in (("box_recall", "min_box_recall"), ("box_precision", "min_box_precision"),
                          ("mention_precision", "min_mention_precision"), ("mention_lift", "min_mention_lift")):
            limit, value = getattr(t, name), _task_figure(figures, task, key)
            if limit is not None and value is not None and value < limit:
                out[task].append(f"{task} {key.replace('_', ' ')} {value:.2f} < {limit}")
    same = figures.get("same_across_tasks")
    if t.max_same_across_tasks is not None and same is not None and same > t.max_same_across_tasks:
        out[MODEL].append(f"same answer to different task prompts {same:.2f} > {t.max_same_across_tasks}")
    measured = sum(1 for fig in tasks.values() if fig.get("distinct") is not None)
    if measured >= 2 and collapsed == measured:
        out[MODEL].append(f"every task collapsed (distinct generations < {t.min_distinct} in all {measured})")
    return dict(out)


def verdict(figures: dict | None, t: HealthThresholds) -> list[str]:
    """Every failed check, the tasks' (in task order) before the model-wide ones (empty: healthy or unchecked)."""
    found = failures(figures, t)
    return [f for scope in sorted(found, key=lambda s: s == MODEL) for f in found[scope]]


def _task_figure(figures: dict, task: str, key: str):
    """A task's agreement figure: its own (per-task figures) or, in summaries written before they existed,
    the round's figure for the task it was measured on (boxes: <OD>; mentions: every caption task)."""
    fig = (figures.get("tasks") or {}).get(task) or {}
    if key in fig:
        return fig[key]
    row = BY_TOKEN.get(task)
    owner = task == "<OD>" if key.startswith("box_") else (row is not None and row.tier is not None)
    return figures.get(key) if owner else None


def headline(figures: dict | None, task: str | None = None) -> dict[str, float]:
    """The round's figures as checks of its annotations (`round.<name>`): re-threshold them in SQL. With
    `task`, that task's own figures (distinct, parse rate, agreement) and the model-wide ones; without,
    the worst of the tasks."""
    if not figures or not figures.get("checked"):
        return {}
    every = figures.get("tasks") or {}
    tasks = [every.get(task) or {}] if task is not None else every.values()
    out = {}
    distinct = [f["distinct"] for f in tasks if f.get("distinct") is not None]
    parse = [f["parse_rate"] for f in tasks if f.get("parse_rate") is not None]
    if distinct:
        out["distinct"] = min(distinct)
    if parse:
        out["parse_rate"] = min(parse)
    if figures.get("same_across_tasks") is not None:
        out["same_across_tasks"] = float(figures["same_across_tasks"])
    for key in ("box_recall", "box_precision", "mention_precision", "mention_lift"):
        value = figures.get(key) if task is None else _task_figure(figures, task, key)
        if value is not None:
            out[key] = float(value)
    return out
