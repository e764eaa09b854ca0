"""Benchmark specialists with known error rates, and no oracle in what the filters can see.

They stand in for the paper's specialists whose output we cannot get offline (a DINO detector,
captioners, Grounding DINO, SAM), so the benchmark knows how wrong stage 1 is and can measure how
much stage 2 and stage 3 recover. bench/quality/DESIGN.md states every design choice; in short:

    stage 1:  sim_detector   object regions from the world's truth through an ERROR MODEL: misses,
                             false positives, duplicates, box jitter, mislocalised boxes, category
                             confusion, colour errors in the brief; miss / confusion / mislocalise /
                             colour rates rise with the object's occlusion and small size
                             (`difficulty`); scores carry only a set ranking power (`score_auc`)
              sim_captioner  brief + detailed captions of a corrupted scene in the captioner's OWN
                             templates, background words and verbs (not the truth's sentence
                             template), with colour / category / count / text swaps, omissions,
                             hallucinations, wrong positions and relations, verb-agreement errors
              sim_grounder   phrases of the kept captions (spaCy noun chunks, the engine's own
                             phrase code) -> boxes: misses, wrong objects, jitter, boxes for
                             phrases that name nothing; box and phrase scores at `score_auc`
              sim_segmenter  SAM's role: OpenCV GrabCut on the image PIXELS from each prompt box
                             (the engine's masks stage, model grabcut); it never reads the truth,
                             and its mask never leaves its prompt box

The truth is read (by the record's file name) only to decide the errors; nothing a filter reads
(box, label, score, checks, mask) carries a correctness flag. Every random choice comes from
(seed, stage, file name): the same output on every runner, batch size and rerun.
"""
from __future__ import annotations

import math
import zlib
from statistics import NormalDist
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from annotators.masks import MaskParams, SamMaskAnnotator
from bench.quality.captioner import Slips, render_caption
from bench.quality.language import CATEGORIES, COLOURS, parse_mentions
from bench.quality.world import SIGN_WORDS, groups_of, load_truth, truth_of
from engine.stage import Resources, Stage, StageParams
from schemas.geometry import clamp_box
from schemas.records import make_ann_id, new_annotation

MODEL = "simulated"
REVISION = "bench.quality/1"
GENERIC_CAPTIONS = {"brief": "Some shapes.", "detailed": "There are some things in this picture."}


class WorldParams(StageParams):
    world: str = Field(..., description="the benchmark world's root folder (world.json, truth/)")
    seed: int = 0


class WorldStage(Stage):
    """Base of the simulated specialists: the world's truth loaded once per worker."""

    Params: ClassVar[type[StageParams]] = WorldParams
    default_resources: ClassVar[Resources] = Resources(cpus=0.5, batch_size=64)

    def setup(self) -> None:
        self.truth = load_truth(self.params.world)
        self._source = self.source(MODEL, REVISION)

    def rng(self, record: dict) -> np.random.Generator:
        """Random stream of this stage on this image: same draws on every runner and batch size."""
        name = truth_of(self.truth, record["uri"])["file"]
        return np.random.default_rng([self.params.seed, zlib.crc32(self.name.encode()), zlib.crc32(name.encode())])

    def truth_for(self, record: dict) -> dict:
        t = truth_of(self.truth, record["uri"])
        if (t["width"], t["height"]) != (record["width"], record["height"]):
            raise ValueError(f"{record['uri']}: record is {record['width']}x{record['height']} but the world's "
                             f"truth is {t['width']}x{t['height']}; was the image re-encoded?")
        return t

    def process_record(self, record: dict, image) -> None:
        self.simulate(record, self.truth_for(record), self.rng(record))

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        raise NotImplementedError


def jitter_box(box: list[float], sigma: float, rng: np.random.Generator, width: int, height: int) -> list[float]:
    """Each coordinate moves by N(0, sigma x the box side); clamped, never empty."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = [x0 + rng.normal(0, sigma * w), y0 + rng.normal(0, sigma * h), x1 + rng.normal(0, sigma * w), y1 + rng.normal(0, sigma * h)]
    out = clamp_box([min(out[0], out[2] - 2), min(out[1], out[3] - 2), max(out[2], out[0] + 2), max(out[3], out[1] + 2)], width, height)
    return out


def mislocalise(box: list[float], rng: np.random.Generator, width: int, height: int) -> list[float]:
    """The box moved by 60-90 % of its size in a random direction (IoU with the object < 0.5)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.6, 0.9)
    dx, dy = shift * w * np.cos(angle), shift * h * np.sin(angle)
    return clamp_box([x0 + dx, y0 + dy, x1 + dx, y1 + dy], width, height)


def random_box(rng: np.random.Generator, width: int, height: int) -> list[float]:
    m = min(width, height)
    side_w, side_h = rng.uniform(0.1, 0.4) * m, rng.uniform(0.1, 0.4) * m
    x0, y0 = rng.uniform(0, width - side_w), rng.uniform(0, height - side_h)
    return [float(x0), float(y0), float(x0 + side_w), float(y0 + side_h)]


def other(value: str, choices, rng: np.random.Generator) -> str:
    options = [c for c in choices if c != value]
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------- error model
def score_separation(auc: float) -> float:
    """d' of two unit-variance Gaussians whose ROC AUC is `auc`: AUC = Phi(d' / sqrt 2)."""
    return math.sqrt(2) * NormalDist().inv_cdf(auc)


def draw_score(rng: np.random.Generator, right: bool, auc: float) -> float:
    """A confidence whose ranking power against correctness is `auc`: sigmoid of N(+-d'/2, 1)
    (right: +, wrong: -). The sigmoid is monotone, so the AUC of the scores is the AUC of the
    Gaussians; 0.5 is a score that knows nothing, 1.0 one that separates perfectly."""
    d = score_separation(auc)
    z = rng.normal(d / 2 if right else -d / 2, 1.0)
    return float(1.0 / (1.0 + math.exp(-z)))


def difficulty(obj: dict, width: int, height: int) -> float:
    """How hard an object is to see, in [0, 1]: the mean of its occlusion (hidden share / 0.5, the
    world's most) and its smallness (relative side sqrt(visible area / image area): 0.3 or more
    -> 0, 0.1 or less -> 1). Read from the truth by the error model only."""
    occlusion = min(1.0, max(0.0, (1.0 - float(obj.get("visible_fraction", 1.0))) / 0.5))
    side = math.sqrt(max(0.0, float(obj["area"])) / float(width * height))
    smallness = min(1.0, max(0.0, (0.3 - side) / 0.2))
    return 0.5 * occlusion + 0.5 * smallness


def error_rate(base: float, hardness: float, gain: float) -> float:
    """`base` at medium difficulty (0.5), its log-odds moved by `gain` x (hardness - 0.5): with
    gain 2 a 10 % rate is 6 % on the easiest object and 16 % on the hardest."""
    if base <= 0.0 or base >= 1.0:
        return base
    z = math.log(base / (1 - base)) + gain * (hardness - 0.5)
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------- detector
class SimDetectorParams(WorldParams):
    miss_rate: float = Field(0.15, ge=0, le=1, description="a true object gets no box")
    false_positives: float = Field(0.5, ge=0, description="mean boxes per image on nothing (Poisson)")
    duplicate_rate: float = Field(0.1, ge=0, le=1, description="a found object gets a second, overlapping box")
    box_jitter: float = Field(0.05, ge=0, description="sigma of each coordinate, x the box side")
    mislocalised_rate: float = Field(0.08, ge=0, le=1, description="the box misses its object (IoU < 0.5)")
    confusion_rate: float = Field(0.1, ge=0, le=1, description="the category is another one")
    colour_error_rate: float = Field(0.1, ge=0, le=1, description="the brief names another colour")
    difficulty: float = Field(2.0, ge=0, description="log-odds the four rates above move from the easiest to the hardest object (occluded, small); 0: the same rate for all")
    score_auc: float = Field(0.8, gt=0, lt=1, description="ROC AUC of the box scores against the box being right")


class SimDetector(WorldStage):
    """A detector with region briefs (category + colour + size), at known error rates."""

    name: ClassVar[str] = "sim_detector"
    Params: ClassVar[type[StageParams]] = SimDetectorParams

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        p: SimDetectorParams = self.params  # type: ignore[assignment]
        w, h = truth["width"], truth["height"]
        found: list[tuple[list[float], str, str, bool]] = []  # box, label, brief, right
        for obj in truth["objects"]:
            hard = difficulty(obj, w, h)
            rate = lambda base: error_rate(base, hard, p.difficulty)  # noqa: E731
            miss, misplace, confuse, recolour = rng.random(4)
            if miss < rate(p.miss_rate):
                continue
            right = True
            category = obj["category"]
            if confuse < rate(p.confusion_rate):
                category, right = other(category, CATEGORIES, rng), False
            mislocalised = misplace < rate(p.mislocalised_rate)
            right = right and not mislocalised
            colour = obj["colour"] if recolour >= rate(p.colour_error_rate) else other(obj["colour"], COLOURS, rng)
            brief = " ".join(x for x in (obj["size"], colour, category) if x)
            copies = 2 if rng.random() < p.duplicate_rate else 1
            # A duplicate is a second box drawn exactly like the first (same jitter, same score
            # distribution, random order): which copy NMS keeps says nothing about which is better.
            for _ in range(copies):
                box = jitter_box(obj["box"], p.box_jitter, rng, w, h)
                if mislocalised:
                    box = mislocalise(box, rng, w, h)
                found.append((box, category, brief, right))
        for _ in range(int(rng.poisson(p.false_positives))):
            category, colour = CATEGORIES[int(rng.integers(len(CATEGORIES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
            found.append((random_box(rng, w, h), category, f"{colour} {category}", False))
        order = rng.permutation(len(found))  # no position in the list tells a duplicate from its original
        for k, i in enumerate(order):
            box, label, brief, right = found[int(i)]
            record["regions"].append(new_annotation(
                self._source, score=draw_score(rng, right, p.score_auc),
                ann_id=make_ann_id(record["image_id"], self.name, "object", k),
                kind="object", box=box, quad=None, polygon=None, mask=None, label=label, brief=brief))


# -------------------------------------------------------------------------- captioner
class SimCaptionerParams(WorldParams):
    tiers: list[Literal["brief", "detailed"]] = Field(default_factory=lambda: ["brief", "detailed"])
    swap_rate: float = Field(0.1, ge=0, le=1, description="per object group: its colour, category, count, sign text each swapped")
    omission_rate: float = Field(0.15, ge=0, le=1, description="per object group: left out")
    hallucinations: float = Field(0.3, ge=0, description="mean objects per caption that are not in the image (Poisson)")
    generic_rate: float = Field(0.05, ge=0, le=1, description="the caption is a generic sentence with no content")
    difficulty: float = Field(2.0, ge=0, description="log-odds the omission rate moves from the easiest to the hardest group (occluded, small)")
    background_error_rate: float = Field(0.1, ge=0, le=1, description="the background is named with another colour")
    position_error_rate: float = Field(0.1, ge=0, le=1, description="a group's position phrase names another third of the image")
    relation_error_rate: float = Field(0.1, ge=0, le=1, description="a stated spatial relation is the opposite one")
    verb_error_rate: float = Field(0.1, ge=0, le=1, description="a verb does not agree with its subject")


class SimCaptioner(WorldStage):
    """Brief and detailed captions of a corrupted scene in the captioner's own wording (captioner.py)."""

    name: ClassVar[str] = "sim_captioner"
    Params: ClassVar[type[StageParams]] = SimCaptionerParams

    def corrupt(self, truth: dict, rng: np.random.Generator) -> list[dict]:
        """The objects this captioner believes it sees."""
        p: SimCaptionerParams = self.params  # type: ignore[assignment]
        w, h = truth["width"], truth["height"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for o in truth["objects"]:
            groups.setdefault((o["category"], o["colour"]), []).append(dict(o))
        out: list[dict] = []
        next_id = 1000
        for (category, colour), members in groups.items():
            hard = min(difficulty(m, w, h) for m in members)  # the group is as easy as its easiest member
            if rng.random() < error_rate(p.omission_rate, hard, p.difficulty):
                continue
            swap_colour, swap_category, swap_count, swap_text = rng.random(4) < p.swap_rate
            if swap_colour:
                colour = other(colour, COLOURS, rng)
            if swap_category and category != "sign":
                category = other(category, [c for c in CATEGORIES if c != "sign"], rng)
            if swap_count:
                if len(members) > 1 and rng.random() < 0.5:
                    members = members[:-1]
                else:
                    extra = dict(members[-1], id=next_id, box=jitter_box(members[-1]["box"], 0.3, rng, w, h))
                    next_id += 1
                    members = members + [extra]
            for m in members:
                m.update(category=category, colour=colour)
                if swap_text and m.get("text"):
                    m["text"] = other(m["text"], SIGN_WORDS, rng)
                out.append(m)
        for _ in range(int(rng.poisson(p.hallucinations))):
            category = [c for c in CATEGORIES if c != "sign"][int(rng.integers(len(CATEGORIES) - 1))]
            box = random_box(rng, w, h)
            out.append({"id": next_id, "category": category, "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                        "size": None, "box": box, "area": (box[2] - box[0]) * (box[3] - box[1]) / 2})
            next_id += 1
        return out

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        p: SimCaptionerParams = self.params  # type: ignore[assignment]
        for k, tier in enumerate(p.tiers):  # each tier is its own specialist: independent errors
            believed = self.corrupt(truth, rng)
            slips = Slips(p.background_error_rate, p.position_error_rate, p.relation_error_rate, p.verb_error_rate)
            if rng.random() < p.generic_rate:
                text = GENERIC_CAPTIONS[tier]
            else:
                text = render_caption(tier, groups_of(believed), tuple(truth["background"]), truth["width"], truth["height"], slips, rng)
            record["texts"].append(new_annotation(
                self._source, ann_id=make_ann_id(record["image_id"], self.name, "texts", k), tier=tier, text=text))


# --------------------------------------------------------------------------- grounder
class SimGrounderParams(WorldParams):
    tiers: list[Literal["brief", "detailed"]] = Field(default_factory=lambda: ["brief", "detailed"])
    miss_rate: float = Field(0.1, ge=0, le=1, description="a phrase naming real objects gets no box")
    wrong_object_rate: float = Field(0.1, ge=0, le=1, description="the box is another object's")
    box_jitter: float = Field(0.05, ge=0)
    phantom_rate: float = Field(0.5, ge=0, le=1, description="a phrase naming nothing in the image still gets a box")
    difficulty: float = Field(2.0, ge=0, description="log-odds the miss and wrong-object rates move from the easiest to the hardest object")
    score_auc: float = Field(0.8, gt=0, lt=1, description="ROC AUC of the box score and of the phrase score against the box being right")
    max_boxes: int = Field(3, ge=1, description="boxes per plural phrase")


class SimGrounder(WorldStage):
    """Text-phrase-region triplets for the noun phrases of the kept captions."""

    name: ClassVar[str] = "sim_grounder"
    Params: ClassVar[type[StageParams]] = SimGrounderParams
    PHRASE_SCORE = "sim_grounder.text_score"  # the key grounding_filter's phrase_score_key names

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        from annotators.phrases import groundable_chunks

        p: SimGrounderParams = self.params  # type: ignore[assignment]
        captions = [(rec, t) for rec in records for t in rec["texts"]
                    if t["tier"] in p.tiers and t["status"] == "kept" and (t["text"] or "").strip()]
        chunks = groundable_chunks([t["text"] for _, t in captions])
        per_record: dict[int, list] = {}
        for (rec, t), cs in zip(captions, chunks):
            per_record.setdefault(id(rec), []).append((t, cs))
        for rec in records:
            self.guarded(rec, lambda rec=rec: self.ground(rec, per_record.get(id(rec), [])))
        return records

    def ground(self, record: dict, captions: list) -> None:
        p: SimGrounderParams = self.params  # type: ignore[assignment]
        truth, rng = self.truth_for(record), self.rng(record)
        w, h = truth["width"], truth["height"]
        objects = truth["objects"]
        k = 0
        for caption, chunks in captions:
            for chunk in chunks:
                mentions = parse_mentions(chunk.text)
                if not mentions:
                    continue  # "the image", "a striped grey background": names no object
                m = mentions[-1]
                targets = [o for o in objects if o["category"] == m.category and (m.colour is None or o["colour"] == m.colour)]
                targets = sorted(targets, key=lambda o: -o["area"])[: (p.max_boxes if m.count > 1 else 1)]
                boxes: list[tuple[list[float], bool]] = []
                if not targets:
                    if objects and rng.random() < p.phantom_rate:
                        boxes.append((objects[int(rng.integers(len(objects)))]["box"], False))
                for o in targets:
                    hard = difficulty(o, w, h)
                    if rng.random() < error_rate(p.miss_rate, hard, p.difficulty):
                        continue
                    if len(objects) > 1 and rng.random() < error_rate(p.wrong_object_rate, hard, p.difficulty):
                        wrong = [x for x in objects if x["id"] != o["id"]]
                        boxes.append((wrong[int(rng.integers(len(wrong)))]["box"], False))
                    else:
                        boxes.append((o["box"], True))
                for box, right in boxes:
                    ann = new_annotation(
                        self._source, score=draw_score(rng, right, p.score_auc),
                        ann_id=make_ann_id(record["image_id"], self.name, "groundings", k, caption["ann_id"]),
                        text_ann_id=caption["ann_id"], phrase=chunk.text, char_start=chunk.start, char_end=chunk.end,
                        box=jitter_box(box, p.box_jitter, rng, w, h), mask=None)
                    ann["checks"] = {self.PHRASE_SCORE: draw_score(rng, right, p.score_auc)}
                    record["groundings"].append(ann)
                    k += 1


# -------------------------------------------------------------------------- segmenter
class SimSegmenterParams(MaskParams):
    model: str = "grabcut"  # the masks stage's reference that selects OpenCV GrabCut (annotators/grabcut.py)


class SimSegmenter(SamMaskAnnotator):
    """SAM's role in stage 1: the engine's own `masks` stage with model grabcut, under the benchmark's
    stage name. It sees the image's pixels and the prompt box, never the world's truth: GrabCut's
    foreground inside the box, clipped to it (checks masks.fg_fraction / .edge_agreement /
    .box_mask_iou, the masks stage's own names). Deterministic (GrabCut's k-means is seeded)."""

    name: ClassVar[str] = "sim_segmenter"
    Params: ClassVar[type[StageParams]] = SimSegmenterParams
