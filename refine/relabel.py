"""Relabel: round k's checkpoint annotates every image for the tasks it was trained on.

The first stage of a round's step (engine StepJob: relabel -> the pipeline's stage-2 filters ->
merge). It sets the record's previous annotations aside under a stash key (engine.stage
STASH_PREFIX, carried to the merge stage of the same step and never written), so the filters
that follow see only this round's annotations, exactly as they saw the specialists' output.

Why a subclass of the `florence2` stage: the mapping from parsed Florence-2 output to records
(clamping, phrase spans of groundings, captions feeding grounding) is that stage's job; the round
only changes who signs the annotations (`source.annotator = "refine"`, `round = k`) and makes the
ids unique across rounds (the round is part of the id, and groundings' `text_ann_id` follow).
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from annotators.florence2 import Florence2Annotator, Florence2Params
from engine.stage import STASH_PREFIX
from schemas.records import ANNOTATION_KINDS, make_ann_id

ANNOTATOR = "refine"
PREVIOUS = STASH_PREFIX + "previous"  # the record's annotations before this round (JSON)


class RelabelParams(Florence2Params):
    round: int = Field(1, ge=1, description="the refinement round these annotations belong to")
    # where `model` (an OUT-relative folder, models/round<k>) is read from: the store's spec (local path
    # or object-store URL + options); each worker copies the folder from there (an execution setting)
    model_store: Any = None


def stamp_round(records: list[dict], round_: int) -> list[dict]:
    """round = k on every annotation, ids re-derived with the round (unique across rounds)."""
    for rec in records:
        iid = rec["image_id"]
        new_ids: dict[str, str] = {}
        for key in ANNOTATION_KINDS:
            for i, ann in enumerate(rec.get(key) or []):
                old = ann["ann_id"]
                ann["ann_id"] = make_ann_id(iid, ANNOTATOR, key, i, f"round{round_}", old)
                ann["round"] = round_
                new_ids[old] = ann["ann_id"]
        for g in rec.get("groundings") or []:
            g["text_ann_id"] = new_ids.get(g["text_ann_id"], g["text_ann_id"])
    return records


class RefineRelabeler(Florence2Annotator):
    """The florence2 stage under the name `refine`, with the previous annotations set aside."""

    name = "refine"
    Params = RelabelParams

    params: RelabelParams

    def setup(self) -> None:
        if self.params.model_store is not None:
            from engine.store import ShardStore

            store = ShardStore.from_spec(self.params.model_store)
            self.models = {**self.models, self.params.model: store.local_dir(self.params.model)}
        super().setup()
        # provenance names the model as the pipeline does (OUT-relative models/round<k>), not where this
        # worker found it, so the same round on two machines writes the same annotations
        self._source = self.source(self.params.model, self.florence.revision)

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        for rec in records:
            rec[PREVIOUS] = json.dumps({key: rec.get(key) or [] for key in (*ANNOTATION_KINDS, "errors")})
            for key in (*ANNOTATION_KINDS, "errors"):
                rec[key] = []
        records = stamp_round(super().process_batch(records, images), self.params.round)
        # counted here: the runners' before/after counts cannot see what this stage made, since it also
        # sets the previous annotations aside
        self.report("images", len(records))
        self.report("images_with_output", sum(1 for r in records if any(r[k] for k in ANNOTATION_KINDS)))
        for key in ANNOTATION_KINDS:
            self.report(f"new_{key}", sum(len(r[key]) for r in records))
        return records
