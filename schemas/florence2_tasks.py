"""The one table of Florence-2 tasks: what each task token means to this project.

Why one table: stage 1 (the `florence2` stage names its tasks `caption`, `od`, ...), the model wrapper
(which tokens take a text input), the offline tokenizer (the prompts are part of its corpus), the task
codec of stage 3 and the Florence export (which tasks get training targets, which caption tier feeds
which caption task) all read the same facts, so they live here once.

`prompt` is the encoder prompt transformers' Florence2Processor substitutes for the token, with
`{input}` where a task's text input goes (docs/florence2.md section 2); tests/test_task_codec.py checks
the table against a real processor. Row order matters: it is the run order of the `florence2` stage
(captions before grounding, which grounds the brief caption of the same batch) and the order of the
codec's examples; both order lists are defaults of configuration hashes, so reordering the table
would make every existing OUT refuse its steps and rounds as "written with another configuration".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Florence2Task:
    token: str  # "<CAPTION>"
    prompt: str  # the processor's prompt; "{input}" where the text input goes
    kind: str  # the annotation list of an image record the task reads or writes: texts | regions | groundings
    stage_task: str | None = None  # its name in the `florence2` stage's `tasks` (None: stage 1 does not run it)
    tier: str | None = None  # the caption tier of a caption task (schemas.records.TIERS)
    trained: bool = False  # the task codec builds training targets for it (stage 3, the Florence export)

    @property
    def takes_input(self) -> bool:
        """The prompt embeds a text input (a caption, a phrase, or a region as <loc_> tokens)."""
        return "{input}" in self.prompt


TASKS: tuple[Florence2Task, ...] = (
    Florence2Task("<CAPTION>", "What does the image describe?", "texts", "caption", "brief", True),
    Florence2Task("<DETAILED_CAPTION>", "Describe in detail what is shown in the image.", "texts",
                  "detailed_caption", "detailed", True),
    Florence2Task("<MORE_DETAILED_CAPTION>", "Describe with a paragraph what is shown in the image.", "texts",
                  "more_detailed_caption", "more_detailed", True),
    Florence2Task("<OD>", "Locate the objects with category name in the image.", "regions", "od", trained=True),
    Florence2Task("<DENSE_REGION_CAPTION>", "Locate the objects in the image, with their descriptions.", "regions",
                  "dense_region_caption", trained=True),
    Florence2Task("<REGION_PROPOSAL>", "Locate the region proposals in the image.", "regions", trained=True),
    Florence2Task("<OCR>", "What is the text in the image?", "regions", trained=True),
    Florence2Task("<OCR_WITH_REGION>", "What is the text in the image, with regions?", "regions", "ocr_with_region",
                  trained=True),
    Florence2Task("<CAPTION_TO_PHRASE_GROUNDING>", "Locate the phrases in the caption: {input}", "groundings",
                  "phrase_grounding", trained=True),
    Florence2Task("<REGION_TO_DESCRIPTION>", "What does the region {input} describe?", "regions", trained=True),
    Florence2Task("<REFERRING_EXPRESSION_SEGMENTATION>", "Locate {input} in the image with mask", "regions",
                  trained=True),
    Florence2Task("<REGION_TO_SEGMENTATION>", "What is the polygon mask of region {input}", "regions", trained=True),
    Florence2Task("<OPEN_VOCABULARY_DETECTION>", "Locate {input} in the image.", "regions"),
    Florence2Task("<REGION_TO_CATEGORY>", "What is the region {input}?", "regions"),
    Florence2Task("<REGION_TO_OCR>", "What text is in the region {input}?", "regions"),
)
BY_TOKEN: dict[str, Florence2Task] = {t.token: t for t in TASKS}
TOKENS: tuple[str, ...] = tuple(BY_TOKEN)

# The `florence2` stage's task names -> tokens, in run order.
STAGE_TASKS: dict[str, str] = {t.stage_task: t.token for t in TASKS if t.stage_task}
STAGE_TASK_NAMES: tuple[str, ...] = tuple(STAGE_TASKS)
# Tasks the codec encodes, in the order of its examples (stage 3's default `train_tasks`).
TRAINED_TOKENS: tuple[str, ...] = tuple(t.token for t in TASKS if t.trained)
# caption tier -> caption task token
CAPTION_TOKENS: dict[str, str] = {t.tier: t.token for t in TASKS if t.tier}


def task(token: str) -> Florence2Task:
    """The row of a task token; ValueError naming the known tokens."""
    try:
        return BY_TOKEN[token]
    except KeyError:
        raise ValueError(f"unknown Florence-2 task {token!r}; known: {', '.join(TOKENS)}") from None
