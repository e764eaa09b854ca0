"""Cross-fitted relabelling (docs/refine.md, "Cross-fitted relabelling"): no image of a round is
relabelled by a model that trained on its own noisy labels.

The round's images are split into k folds by a hash of the image id (`fold_of`: the same fold on
every worker, shard layout and rerun). Fold model i trains on the images of the other k-1 folds
(its validation images, for the loss, the best checkpoint and the health check, are chosen among
those too, so nothing of fold i reaches it) and relabels fold i. The round's published model,
`models/round<k>/` (what round k+1 starts from and what relabels images outside the round's
training data, e.g. a held-out OUT seeded with it), is still trained on every image of the round:
cross-fitting costs k extra trainings. The fold models live next to it in
`models/round<k>-folds/fold<i>/`.

`folds: auto` (the default) cross-fits with 2 folds once the round's input has at least
`min_images` images, and not below (e.g. the quickstart's 11 sample images): with fewer images each fold
model would train on a handful of images and hold out too few validation images for a health check.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from engine.values import BoundedModel

AUTO_FOLDS = 2


class CrossFitSettings(BoundedModel):  # finite numbers, 64-bit integers
    """The `refine.cross_fit` block (or the shorthand `cross_fit: auto | 0 | k`)."""

    model_config = ConfigDict(extra="forbid")

    folds: Literal["auto"] | int = Field(
        "auto", description="folds of the round's images (by image-id hash); fold model i trains on the other folds and "
        "relabels fold i, so no image is relabelled by a model that saw its own noisy labels (the standard way to get "
        "out-of-sample predictions on noisy data). 0: off (every image relabelled by the round's model, which trained "
        "on it). auto (default): 2 once the round's input has min_images images, off below: with fewer images each "
        "fold model trains on a handful of images and holds out too few to be health-checked. Each fold costs one "
        "more training of train.steps steps (the round's model is still trained on every image)")
    min_images: int = Field(32, ge=2, description="folds: auto cross-fits from this many images of the round's input "
                            "(rows of its committed shards); the quickstart (11 sample images) stays off")

    @field_validator("folds")
    @classmethod
    def _folds(cls, v):
        if v != "auto" and v != 0 and v < 2:
            raise ValueError(f"auto, 0 or an integer >= 2 (one fold would relabel with a model that saw every image), not {v!r}")
        return v

    def resolve(self, images: int) -> int:
        """The number of folds for a round over `images` images (0: no cross-fitting)."""
        if self.folds == "auto":
            return AUTO_FOLDS if images >= self.min_images else 0
        return int(self.folds) if images >= int(self.folds) else 0


def fold_of(image_id: str, folds: int) -> int:
    """The fold of an image: a function of its id alone."""
    return int(hashlib.sha256(f"fold:{image_id}".encode()).hexdigest()[:15], 16) % folds


def folds_folder(model_folder: str) -> str:
    """Where a round's fold models live (a sibling of its published model, models/round<k>-folds)."""
    return f"{model_folder}-folds"


def fold_folder(model_folder: str, fold: int) -> str:
    return f"{folds_folder(model_folder)}/fold{fold}"


class OutsideFold:
    """keep(image_id) of fold model `fold`'s training data: the images of the other folds."""

    def __init__(self, fold: int, folds: int):
        self.fold, self.folds = fold, folds

    def __call__(self, image_id: str) -> bool:
        return fold_of(image_id, self.folds) != self.fold
