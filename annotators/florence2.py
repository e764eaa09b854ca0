"""Stage `florence2`: captions, objects, dense region captions, OCR lines and phrase grounding
from one Florence-2 checkpoint.

Why Florence-2 as a specialist: the paper's brief-caption specialist is a Florence-2 captioner,
and once a round of refinement exists (stage 3) the engine's own checkpoint re-annotates every
task. Generated text is parsed by the processor's own `post_process_generation` (transformers'
rules for location tokens), then mapped to records in original-image pixels. The mapping takes
a text, not a model call (`annotate_from_text`), so tests can feed hand-written sequences.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from annotators.florence2_model import Florence2Model
from annotators.florence2_scores import Generated, instance_scores
from engine.random_models import check as check_random
from engine.stage import Resources, Stage, StageParams, record_error
from schemas.florence2_tasks import BY_TOKEN, STAGE_TASK_NAMES, STAGE_TASKS
from schemas.geometry import clamp_points, quad_to_box
from schemas.records import make_ann_id, new_annotation

# The stage's task names (schemas.florence2_tasks), in run order: captions before grounding
# (grounding reads the brief caption of the same batch).
TaskName = Literal[STAGE_TASK_NAMES]  # type: ignore[valid-type]


class Florence2Params(StageParams):
    model: str = Field("florence2", description="model reference or an alias of the pipeline's models:")
    tasks: list[TaskName] = Field(default_factory=lambda: list(STAGE_TASKS), min_length=1)
    max_new_tokens: int = Field(1024, ge=1, description="the hub checkpoints' default; dense outputs need it")
    num_beams: int = Field(3, ge=1, description="Florence-2's recommended decoding")
    no_repeat_ngram_size: int = Field(3, ge=0, description="0 disables; 3 as the hub generation config")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="None: float32 on CPU, bfloat16 on CUDA"
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must not repeat: {v}")
        return v


# ------------------------------------------------------------------------ geometry
def _clamp_or_none(box: list[float], width: int, height: int) -> list[float] | None:
    """Clamp each coordinate into the image; None for a degenerate or inverted box.

    An inverted box (x1 < x0) is a malformed generation, not a box to be re-sorted.
    """
    x0, y0, x1, y1 = clamp_points(box, width, height)
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


_TOKEN_DEBRIS = re.compile(r"loc_\d+|</?poly>|<sep>")


def is_token_debris(label: str) -> bool:
    """A label made of location-token fragments ("loc_200>") is a malformed generation of a
    barely-trained model, not a category: keeping it would teach the next round garbage."""
    return bool(_TOKEN_DEBRIS.search(label)) or label.strip("<>/ ") == ""


def find_phrase(caption: str, phrase: str, start: int) -> tuple[int, int] | None:
    """Char span of the first occurrence of phrase at or after start (exact, then case-insensitive)."""
    pos = caption.find(phrase, start)
    if pos >= 0:
        return pos, pos + len(phrase)
    m = re.compile(re.escape(phrase), re.IGNORECASE).search(caption, start)
    return (m.start(), m.end()) if m else None


def _nth(scores: list | None, phrase: int, box: int) -> float | None:
    """The score of a phrase's box: a list per phrase, or one value for the phrase (the whole
    sequence's, when the alignment fell back)."""
    if scores is None:
        return None
    value = scores[phrase]
    return value[box] if isinstance(value, list) else value


# ------------------------------------------------------------------------- stage
class Florence2Annotator(Stage):
    """Florence-2 over a batch of images, one batched generate per task."""

    name = "florence2"
    Params = Florence2Params
    default_resources = Resources(cpus=1.0, gpus=0.0, batch_size=4, concurrency=1)
    needs_images = True
    uses_model = True
    model_params = {"model": "hf"}

    params: Florence2Params

    def check_model(self, param: str, ref: str) -> None:
        check_random("florence2", ref)

    def setup(self) -> None:
        self.model_ref = self.resolve_model(self.params.model)
        self.florence = Florence2Model.load(self.model_ref, dtype=self.params.dtype)
        self._source = self.source(self.model_ref, self.florence.revision)

    @property
    def gen_kwargs(self) -> dict[str, Any]:
        p = self.params
        return {"max_new_tokens": p.max_new_tokens, "num_beams": p.num_beams, "no_repeat_ngram_size": p.no_repeat_ngram_size}

    # ---------------------------------------------------------------- batching
    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        pixels: dict[int, Any] = dict(enumerate(images))
        order = [name for name in STAGE_TASKS if name in self.params.tasks]
        captions: dict[int, dict] = {}  # record index -> brief caption made in this batch
        for name in order:
            task = STAGE_TASKS[name]
            if task == "<CAPTION_TO_PHRASE_GROUNDING>":
                inputs = {i: self._grounding_caption(records[i], captions.get(i)) for i in pixels}
                todo = [i for i in pixels if inputs[i] is not None]
                gens = self._generate(records, pixels, todo, task, [inputs[i]["text"] for i in todo])
                for i, gen in gens.items():
                    self.guarded(records[i], lambda i=i, gen=gen: self.annotate_from_text(records[i], task, gen.text, inputs[i], gen))
                continue
            gens = self._generate(records, pixels, list(pixels), task, None)
            for i, gen in gens.items():
                added = self.guarded(records[i], lambda i=i, gen=gen: self.annotate_from_text(records[i], task, gen.text, generated=gen))
                if task == "<CAPTION>" and added:
                    captions[i] = added[0]
        return records

    def _generate(
        self, records: list[dict], pixels: dict[int, Any], todo: list[int], task: str, text_inputs: list[str] | None
    ) -> dict[int, Generated]:
        """Batched generate (texts + token log-probs) in chunks of batch_size; a failing chunk is retried
        image by image so one bad image is recorded on its record and the others still get annotations."""
        out: dict[int, Generated] = {}
        size = max(1, self.resources.batch_size)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            chunk_inputs = text_inputs[start : start + size] if text_inputs is not None else None
            try:
                texts = self.florence.generate_scored([pixels[i] for i in chunk], task, chunk_inputs, **self.gen_kwargs)
                out.update(zip(chunk, texts))
            except Exception:  # noqa: BLE001 - isolate the failing image below
                for k, i in enumerate(chunk):
                    one = [chunk_inputs[k]] if chunk_inputs is not None else None
                    try:
                        out[i] = self.florence.generate_scored([pixels[i]], task, one, **self.gen_kwargs)[0]
                    except Exception as exc:  # noqa: BLE001 - per-element error contract
                        record_error(records[i], self.name, exc)
        return out

    @staticmethod
    def _grounding_caption(record: dict, made_now: dict | None) -> dict | None:
        """The brief caption to ground: this batch's, else the record's first kept brief text."""
        if made_now is not None:
            return made_now
        for t in record.get("texts") or []:
            if t.get("tier") == "brief" and t.get("status") == "kept" and (t.get("text") or "").strip():
                return t
        return None

    # ----------------------------------------------------------------- mapping
    def annotate_from_text(
        self, record: dict, task: str, text: str, caption: dict | None = None, generated: Generated | None = None
    ) -> list[dict]:
        """Parse a generated text with the processor and append the annotations to the record.

        Returns the annotations added. `caption` (a text annotation) is the grounded caption of
        <CAPTION_TO_PHRASE_GROUNDING>. `generated` (the generation's token log-probs) gives each
        annotation the model's confidence as its score (annotators.florence2_scores); without it
        (a hand-written text) the score is None.
        """
        post_type = self.florence.processor.tasks_answer_post_processing_type.get(task, "pure_text")
        row = BY_TOKEN.get(task)
        if row is None or row.stage_task is None:
            raise ValueError(f"florence2 stage maps {sorted(STAGE_TASKS.values())}, not {task!r}")
        w, h = int(record["width"]), int(record["height"])
        kind = row.stage_task
        if row.tier is not None:
            answer = self.florence.parse(text, task, (w, h))[task]
            anns = self.texts_from_answer(record, kind, row.tier, answer)
            for ann in anns:
                ann["score"] = generated.sequence_score if generated is not None else None
            record.setdefault("texts", []).extend(anns)
        elif row.kind == "regions":
            answer = self.florence.parse(text, task, (w, h))[task]
            scores = instance_scores(generated, post_type, len(answer["labels"])) if generated is not None else None
            anns = self.regions_from_answer(record, kind, answer, scores)
            record.setdefault("regions", []).extend(anns)
        else:
            if caption is None:
                raise ValueError(f"{task} needs the caption annotation it grounds")
            # The processor's own post-processor (the one post_process_generation calls), at
            # instance level: several boxes of one phrase share one char span.
            instances = self.florence.processor.post_processor(
                text=text, image_size=(w, h), parse_tasks=["phrase_grounding"]
            )["phrase_grounding"]
            scores = None
            if generated is not None:
                banned = frozenset(self.florence.processor.post_processor.banned_grounding_tokens or ())
                scores = instance_scores(generated, post_type, len(instances), banned)
            anns = self.groundings_from_instances(record, kind, caption, instances, scores)
            record.setdefault("groundings", []).extend(anns)
        return anns

    def texts_from_answer(self, record: dict, kind: str, tier: str, answer: str) -> list[dict]:
        text = answer.strip()
        if not text:
            return []  # an empty generation is no caption
        return [new_annotation(self._source, ann_id=make_ann_id(record["image_id"], self.name, kind, 0), tier=tier, text=text)]

    def regions_from_answer(self, record: dict, kind: str, answer: dict, scores: list | None = None) -> list[dict]:
        """Object regions from <OD> / <DENSE_REGION_CAPTION> boxes (a dense caption is also the
        region's brief), text regions from <OCR_WITH_REGION> quads."""
        w, h = int(record["width"]), int(record["height"])
        quads = "quad_boxes" in answer
        out = []
        for k, (geometry, label) in enumerate(zip(answer["quad_boxes" if quads else "bboxes"], answer["labels"])):
            quad = clamp_points(geometry, w, h) if quads else None
            box = _clamp_or_none(quad_to_box(quad) if quads else geometry, w, h)
            label = (label or "").strip()
            if box is None or not label or is_token_debris(label):
                continue  # degenerate box, or a region without its text
            out.append(
                new_annotation(
                    self._source,
                    scores[k] if scores is not None else None,
                    ann_id=make_ann_id(record["image_id"], self.name, kind, k),
                    kind="text" if quads else "object",
                    box=box,
                    quad=quad,
                    polygon=None,
                    mask=None,
                    label=label,
                    brief=label if kind == "dense_region_caption" else None,
                )
            )
        return out

    def groundings_from_instances(
        self, record: dict, kind: str, caption: dict, instances: list[dict], scores: list | None = None
    ) -> list[dict]:
        """One grounding per box; the phrase's span is its first occurrence after the previous
        phrase (phrases come in caption order); a phrase not in the caption is skipped."""
        w, h = int(record["width"]), int(record["height"])
        text = caption["text"]
        cursor = 0
        first = 0  # flat index of this instance's first box, as post_process_generation lists them
        out = []
        for n, inst in enumerate(instances):
            phrase, boxes = inst["cat_name"].strip(), inst["bbox"]
            span = find_phrase(text, phrase, cursor) if phrase else None
            if span is not None:
                cursor = span[1]
                for j, box in enumerate(boxes):
                    clamped = _clamp_or_none(box, w, h)
                    if clamped is None:
                        continue
                    out.append(
                        new_annotation(
                            self._source,
                            _nth(scores, n, j),
                            ann_id=make_ann_id(record["image_id"], self.name, kind, first + j, caption["ann_id"]),
                            text_ann_id=caption["ann_id"],
                            phrase=text[span[0] : span[1]],
                            char_start=span[0],
                            char_end=span[1],
                            box=clamped,
                            mask=None,
                        )
                    )
            first += len(boxes)
        return out
