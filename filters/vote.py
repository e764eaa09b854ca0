"""Vote filter (stage 2): an ensemble of the detectors of stage 1. A box is kept when at least
`min_sources` of the sources that annotated the image found it; the agreeing boxes are fused by
weighted box fusion (WBF, Solovyev et al. 2021) into one new region.

GranD (the engine behind GLaMM) keeps a box when 2 of its 4 detectors find it; the filters of
stage 2 otherwise only trade recall for precision, agreement raises precision by itself.

- Sources: each distinct `source` (annotator, model, params hash) of the image's kept, non-human
  regions of a voting kind, e.g. two `detect` stages (SSD + DETR) and Florence-2 `<OD>` are three
  sources. `sources:` (names `annotator` or `annotator/model`) restricts the vote to some of them; the
  others' regions are left alone.
- Categories are reconciled before boxes are compared, the way region_text names regions (the
  detector's category phrase): lower case, single spaces (annotators.phrases.normalize_phrase),
  then `synonyms` (e.g. motorbike -> motorcycle, across COCO / VOC / Objects365 / Open Images names).
- Clustering (per image, per kind): boxes in rank order (score, then ann_id: the same on every
  runner) join the cluster of the same category whose fused box overlaps them most with IoU >=
  `iou[kind]` (torchvision.ops.box_iou), else start one. A cluster's fused box is the mean of its
  boxes weighted by score x source weight; its score is the sum over its sources of the source's
  best score x weight, divided by the weights of all sources of the image (WBF's rescaling: a box
  two of four detectors found at 0.8 scores 0.4).
- Decision: a cluster with fewer than `min_sources` distinct sources: its boxes are dropped
  (`vote:too_few_sources`). Otherwise a new region (annotator `vote`) carries the fused box, score
  and the best-ranked member's category and brief, and its members are dropped as `vote:fused`
  (they stay in the data, with their checks, for the audit).
Checks on every voting region (members and fused): `vote.agree` (distinct sources in its cluster),
`vote.sources` (sources voting on the image), `vote.iou` (IoU of the box with its cluster's fused box).
A rerun removes the regions it made and forgets its decisions first (idempotent).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from annotators.phrases import normalize_phrase
from engine.stage import Resources, Stage, StageParams
from filters.decision import Threshold, drop, is_kept, reset_all, set_check
from filters.per_kind import merge_per_key
from filters.region import rank_key
from schemas.geometry import box_to_quad
from schemas.records import REGION_KINDS, make_ann_id, new_annotation

DEFAULT_IOU: dict[str, float] = {"object": 0.55, "text": 0.5}
# names the common detector vocabularies give the same thing (COCO, Pascal VOC, Objects365, Open Images)
DEFAULT_SYNONYMS: dict[str, str] = {
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv", "tv monitor": "tv",
    "television": "tv", "diningtable": "dining table", "pottedplant": "potted plant", "cell phone": "mobile phone",
    "cellphone": "mobile phone", "man": "person", "woman": "person", "human": "person", "people": "person",
    "automobile": "car", "bike": "bicycle", "puppy": "dog", "kitten": "cat", "hand bag": "handbag",
}


class VoteParams(StageParams):
    min_sources: int = Field(2, ge=1, description="keep a box that at least this many sources found (k of n)")
    iou: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_IOU),
                                  description="per kind: a box joins a cluster with IoU >= this")
    kinds: list[str] = Field(default_factory=lambda: ["object"], description="region kinds that vote")
    sources: list[str] = Field(default_factory=list, description="voting sources (annotator or annotator/model); "
                               "empty: every non-human source")
    weights: dict[str, float] = Field(default_factory=dict, description="source (annotator or annotator/model) -> "
                                      "weight in the fusion; default 1")
    synonyms: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_SYNONYMS),
                                     description="category name -> the name it is counted as")
    class_agnostic: bool = Field(False, description="boxes of different categories may agree")

    @field_validator("iou", mode="before")
    @classmethod
    def _per_kind(cls, value: Any) -> dict:
        merged = merge_per_key(value, DEFAULT_IOU, REGION_KINDS, "iou")
        for kind, v in merged.items():
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"iou.{kind} must be in (0, 1], got {v}")
        return merged

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(REGION_KINDS))
        if unknown or not value:
            raise ValueError(f"kinds must be some of {list(REGION_KINDS)}, got {value}")
        return value


def source_key(ann: dict) -> tuple[str, str, str]:
    s = ann.get("source") or {}
    return (s.get("annotator") or "", s.get("model") or "", s.get("params_hash") or "")


def _names(key: tuple[str, str, str]) -> tuple[str, str]:
    return key[0], f"{key[0]}/{key[1]}"


def fuse(boxes: list[list[float]], weights: list[float]) -> list[float]:
    """Weighted mean of boxes (WBF's coordinate fusion)."""
    total = sum(weights)
    return [sum(b[i] * w for b, w in zip(boxes, weights)) / total for i in range(4)]


class VoteFilter(Stage):
    """Keeps boxes that several stage-1 sources agree on, fused into one region each."""

    name: ClassVar[str] = "vote"
    Params: ClassVar[type[StageParams]] = VoteParams
    default_resources: ClassVar[Resources] = Resources(cpus=0.5, batch_size=64)

    params: VoteParams

    def thresholds(self) -> list[Threshold]:
        return [Threshold("regions", f"{self.name}.agree", "min_sources", float(self.params.min_sources),
                          param=("min_sources",))]

    def category(self, label: str | None) -> str:
        if self.params.class_agnostic:
            return ""
        name = normalize_phrase(label or "")
        return self.params.synonyms.get(name, name)

    def _votes(self, key: tuple[str, str, str]) -> bool:
        if key[0] in ("human", self.name):
            return False
        return not self.params.sources or bool(set(_names(key)) & set(self.params.sources))

    def _weight(self, key: tuple[str, str, str]) -> float:
        annotator, full = _names(key)
        return float(self.params.weights.get(full, self.params.weights.get(annotator, 1.0)))

    def process_batch(self, records: list[dict], images: list | None) -> list[dict]:
        reset_all(records, self.name, ("regions",))
        for rec in records:
            rec["regions"] = [r for r in rec.get("regions") or [] if source_key(r)[0] != self.name]
            self.guarded(rec, lambda rec=rec: self.vote_record(rec))
        return records

    def vote_record(self, rec: dict) -> None:
        for kind in self.params.kinds:
            voters = [r for r in rec["regions"] if r.get("kind") == kind and is_kept(r) and self._votes(source_key(r))]
            if voters:
                self._vote(rec, kind, sorted(voters, key=rank_key))

    def _vote(self, rec: dict, kind: str, ranked: list[dict]) -> None:
        import torch
        from torchvision.ops import box_iou

        p = self.params
        keys = sorted({source_key(r) for r in ranked})
        all_weight = sum(self._weight(k) for k in keys)
        clusters: list[dict] = []  # {"category", "members", "box"}
        for ann in ranked:
            cat = self.category(ann.get("label"))
            same = [c for c in clusters if c["category"] == cat]
            best = None
            if same:
                iou = box_iou(torch.tensor([ann["box"]], dtype=torch.float64),
                              torch.tensor([c["box"] for c in same], dtype=torch.float64))[0]
                j = int(iou.argmax())
                if float(iou[j]) >= p.iou[kind]:
                    best = same[j]
            if best is None:
                best = {"category": cat, "members": []}
                clusters.append(best)
            best["members"].append(ann)
            best["box"] = fuse([m["box"] for m in best["members"]], [self._member_weight(m) for m in best["members"]])
        for index, c in enumerate(clusters):
            members = c["members"]
            agree = len({source_key(m) for m in members})
            ious = box_iou(torch.tensor([m["box"] for m in members], dtype=torch.float64),
                           torch.tensor([c["box"]], dtype=torch.float64))[:, 0].tolist()
            for m, iou in zip(members, ious):
                set_check(m, self.name, "agree", agree)
                set_check(m, self.name, "sources", len(keys))
                set_check(m, self.name, "iou", iou)
                drop(m, self.name, "too_few_sources" if agree < p.min_sources else "fused")
            if agree >= p.min_sources:
                rec["regions"].append(self._fused(rec, kind, index, c, agree, len(keys), all_weight))

    def _member_weight(self, ann: dict) -> float:
        score = ann.get("score")
        return (1.0 if score is None else max(float(score), 1e-6)) * self._weight(source_key(ann))

    def _fused(self, rec: dict, kind: str, index: int, cluster: dict, agree: int, n: int, all_weight: float) -> dict:
        members = cluster["members"]
        best_per_source: dict[tuple, float] = {}
        for m in members:
            s = 1.0 if m.get("score") is None else float(m["score"])
            best_per_source[source_key(m)] = max(best_per_source.get(source_key(m), s), s)
        score = sum(s * self._weight(k) for k, s in best_per_source.items()) / all_weight
        head = members[0]  # the best-ranked member names the region
        box = [float(v) for v in cluster["box"]]
        ann = new_annotation(
            self.source(), score=float(score), round_=int(head.get("round") or 0),
            ann_id=make_ann_id(rec["image_id"], self.name, kind, index, self.params_hash),
            kind=kind, box=box, quad=box_to_quad(box) if kind == "text" else None, polygon=None, mask=None,
            label=head.get("label"), brief=head.get("brief"))
        set_check(ann, self.name, "agree", agree)
        set_check(ann, self.name, "sources", n)
        set_check(ann, self.name, "iou", 1.0)
        return ann
