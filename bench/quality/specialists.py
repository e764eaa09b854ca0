"""Benchmark specialists with known error rates: ordinary stages that read the world's truth
(by the record's file name) and corrupt it at the rates their parameters give.

They stand in for the paper's specialists whose output we cannot get offline (a DINO detector,
captioners, Grounding DINO, SAM), so the benchmark knows exactly how wrong stage 1 is and can
measure how much stage 2 and stage 3 recover. They sign their annotations with their own stage
name (provenance annotator = sim_detector, ...), never see pixels, and draw every random choice
from (seed, stage, file name): the same output on every runner, batch size and rerun.

    stage 1:  sim_detector   object regions: misses, false positives, duplicates, box jitter,
                             mislocalised boxes, category confusion, colour errors in the brief,
                             scores drawn from a higher Beta for right boxes than for wrong ones
              sim_captioner  brief + detailed captions: colour / category / count swaps,
                             omitted and hallucinated objects, generic captions
              sim_grounder   phrases of the kept captions (spaCy noun chunks, the engine's own
                             phrase code) -> boxes: misses, wrong objects, jitter, boxes for
                             phrases that name nothing in the image; box and phrase scores
              sim_segmenter  SAM's role: each box -> the visible mask of the object whose box fits it
                             best (a mislocalised box still snaps to an object), boundary noise
"""
from __future__ import annotations

import zlib
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from bench.quality.language import CATEGORIES, COLOURS, parse_mentions
from bench.quality.world import SIGN_WORDS, describe, load_truth, truth_of
from engine.stage import Resources, Stage, StageParams
from schemas.geometry import clamp_box, mask_to_rle, rle_to_mask
from schemas.records import make_ann_id, new_annotation

MODEL = "simulated"
REVISION = "bench.quality/1"
GENERIC_CAPTIONS = {"brief": "Some shapes.", "detailed": "There are some things in this picture."}
Beta = tuple[float, float]


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


def draw_score(rng: np.random.Generator, right: bool, correct: Beta, wrong: Beta) -> float:
    a, b = correct if right else wrong
    return float(rng.beta(a, b))


# --------------------------------------------------------------------------- detector
class SimDetectorParams(WorldParams):
    miss_rate: float = Field(0.15, ge=0, le=1, description="a true object gets no box")
    false_positives: float = Field(0.5, ge=0, description="mean boxes per image on nothing (Poisson)")
    duplicate_rate: float = Field(0.1, ge=0, le=1, description="a found object gets a second, overlapping box")
    box_jitter: float = Field(0.05, ge=0, description="sigma of each coordinate, x the box side")
    mislocalised_rate: float = Field(0.08, ge=0, le=1, description="the box misses its object (IoU < 0.5)")
    confusion_rate: float = Field(0.1, ge=0, le=1, description="the category is another one")
    colour_error_rate: float = Field(0.1, ge=0, le=1, description="the brief names another colour")
    score_correct: Beta = Field((5.0, 2.0), description="Beta(a, b) of the score of a right box")
    score_wrong: Beta = Field((2.0, 4.0), description="Beta(a, b) of the score of a wrong box")


class SimDetector(WorldStage):
    """A detector with region briefs (category + colour + size), at known error rates."""

    name: ClassVar[str] = "sim_detector"
    Params: ClassVar[type[StageParams]] = SimDetectorParams

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        p: SimDetectorParams = self.params  # type: ignore[assignment]
        w, h = truth["width"], truth["height"]
        found: list[tuple[list[float], str, str, bool]] = []  # box, label, brief, right
        for obj in truth["objects"]:
            miss, misplace, confuse, recolour = rng.random(4)
            if miss < p.miss_rate:
                continue
            box = jitter_box(obj["box"], p.box_jitter, rng, w, h)
            right = True
            if misplace < p.mislocalised_rate:
                box, right = mislocalise(box, rng, w, h), False
            category = obj["category"]
            if confuse < p.confusion_rate:
                category, right = other(category, CATEGORIES, rng), False
            colour = obj["colour"] if recolour >= p.colour_error_rate else other(obj["colour"], COLOURS, rng)
            brief = " ".join(x for x in (obj["size"], colour, category) if x)
            found.append((box, category, brief, right))
            if rng.random() < p.duplicate_rate:
                found.append((jitter_box(box, 2 * p.box_jitter, rng, w, h), category, brief, False))
        for _ in range(int(rng.poisson(p.false_positives))):
            category, colour = CATEGORIES[int(rng.integers(len(CATEGORIES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
            found.append((random_box(rng, w, h), category, f"{colour} {category}", False))
        for k, (box, label, brief, right) in enumerate(found):
            record["regions"].append(new_annotation(
                self._source, score=draw_score(rng, right, p.score_correct, p.score_wrong),
                ann_id=make_ann_id(record["image_id"], self.name, "object", k),
                kind="object", box=box, quad=None, polygon=None, mask=None, label=label, brief=brief))


# -------------------------------------------------------------------------- captioner
class SimCaptionerParams(WorldParams):
    tiers: list[Literal["brief", "detailed"]] = Field(default_factory=lambda: ["brief", "detailed"])
    swap_rate: float = Field(0.1, ge=0, le=1, description="per object group: its colour, category, count, sign text each swapped")
    omission_rate: float = Field(0.15, ge=0, le=1, description="per object group: left out")
    hallucinations: float = Field(0.3, ge=0, description="mean objects per caption that are not in the image (Poisson)")
    generic_rate: float = Field(0.05, ge=0, le=1, description="the caption is a generic sentence with no content")


class SimCaptioner(WorldStage):
    """Brief and detailed captions rendered by the world's grammar from a corrupted scene."""

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
            if rng.random() < p.omission_rate:
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
            if rng.random() < p.generic_rate:
                text = GENERIC_CAPTIONS[tier]
            else:
                text = describe(believed, tuple(truth["background"]), truth["width"], truth["height"], truth["style"])[tier].text
            record["texts"].append(new_annotation(
                self._source, ann_id=make_ann_id(record["image_id"], self.name, "texts", k), tier=tier, text=text))


# --------------------------------------------------------------------------- grounder
class SimGrounderParams(WorldParams):
    tiers: list[Literal["brief", "detailed"]] = Field(default_factory=lambda: ["brief", "detailed"])
    miss_rate: float = Field(0.1, ge=0, le=1, description="a phrase naming real objects gets no box")
    wrong_object_rate: float = Field(0.1, ge=0, le=1, description="the box is another object's")
    box_jitter: float = Field(0.05, ge=0)
    phantom_rate: float = Field(0.5, ge=0, le=1, description="a phrase naming nothing in the image still gets a box")
    score_correct: Beta = (5.0, 2.0)
    score_wrong: Beta = (2.0, 4.0)
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
                    if rng.random() < p.miss_rate:
                        continue
                    if len(objects) > 1 and rng.random() < p.wrong_object_rate:
                        wrong = [x for x in objects if x["id"] != o["id"]]
                        boxes.append((wrong[int(rng.integers(len(wrong)))]["box"], False))
                    else:
                        boxes.append((o["box"], True))
                for box, right in boxes:
                    ann = new_annotation(
                        self._source, score=draw_score(rng, right, p.score_correct, p.score_wrong),
                        ann_id=make_ann_id(record["image_id"], self.name, "groundings", k, caption["ann_id"]),
                        text_ann_id=caption["ann_id"], phrase=chunk.text, char_start=chunk.start, char_end=chunk.end,
                        box=jitter_box(box, p.box_jitter, rng, w, h), mask=None)
                    ann["checks"] = {self.PHRASE_SCORE: draw_score(rng, right, p.score_correct, p.score_wrong)}
                    record["groundings"].append(ann)
                    k += 1


# -------------------------------------------------------------------------- segmenter
class SimSegmenterParams(WorldParams):
    targets: list[Literal["regions", "groundings"]] = Field(default_factory=lambda: ["regions", "groundings"])
    boundary_noise: float = Field(1.0, ge=0, description="sigma in pixels of the mask's boundary shift (dilate / erode)")
    min_box_iou: float = Field(0.1, ge=0, le=1, description="below this IoU with every object's box, the box gets an ellipse (a background blob)")


class SimSegmenter(WorldStage):
    """SAM's role: a mask for every kept object box and grounding box."""

    name: ClassVar[str] = "sim_segmenter"
    Params: ClassVar[type[StageParams]] = SimSegmenterParams

    def mask_for(self, box: list[float], truth: dict, masks: list[np.ndarray], rng: np.random.Generator) -> dict:
        """The visible mask of the object whose box fits the prompt box best (box prompts snap to
        an object), its boundary moved by a few pixels; an ellipse when the box fits no object."""
        from PIL import Image, ImageDraw
        from scipy import ndimage

        from schemas.geometry import box_iou

        p: SimSegmenterParams = self.params  # type: ignore[assignment]
        ious = [box_iou(box, o["box"]) for o in truth["objects"]]
        best = int(np.argmax(ious)) if ious else -1
        if best >= 0 and ious[best] >= p.min_box_iou:
            mask = masks[best]
            shift = int(round(rng.normal(0, p.boundary_noise)))
            if shift > 0:
                mask = ndimage.binary_dilation(mask, iterations=shift)
            elif shift < 0:
                eroded = ndimage.binary_erosion(mask, iterations=-shift)
                mask = eroded if eroded.any() else mask
        else:
            img = Image.new("L", (truth["width"], truth["height"]), 0)
            ImageDraw.Draw(img).ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
            mask = np.asarray(img) > 127
        return mask_to_rle(mask)

    def simulate(self, record: dict, truth: dict, rng: np.random.Generator) -> None:
        p: SimSegmenterParams = self.params  # type: ignore[assignment]
        masks = [rle_to_mask(o["mask"]) for o in truth["objects"]]
        for key in p.targets:
            for ann in record[key]:
                if ann["status"] != "kept" or (key == "regions" and ann["kind"] != "object"):
                    continue
                ann["mask"] = self.mask_for(ann["box"], truth, masks, rng)

