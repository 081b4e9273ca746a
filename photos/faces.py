"""Face detection and face-aware square crops for photo intake.

Uses the frontal-face Haar cascade that ships inside the opencv-python-headless 4.x wheel, so
finding a face needs no model download and no GPU. The cascade is only a hint for framing and
for friendly warnings: a photo is never refused because of what it finds.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""x, y, width, height in pixels."""

CASCADE_FILE = "haarcascade_frontalface_default.xml"

DETECT_LONG_SIDE = 512
"""Detection runs on a copy this long: Haar cost grows with pixels, and a face that matters for
a selfie is still dozens of pixels wide at this size."""

MIN_FACE_PX = 32
"""Smallest face looked for, at detection scale (6% of the long side, 0.5% of a 4:3 photo's area,
a quarter of the small-face limit). The smallest windows cost the most, and a face that small
would only be flagged anyway."""

SCALE_STEP = 1.2
"""Pyramid step between window sizes: 1.2 finds every face of the synthetic corpus, as 1.1 does,
in about half the time; the crop does not need a tighter box."""

MIN_NEIGHBOURS = 5
"""Overlapping hits needed to accept a face: fewer lets texture (hair, foliage) count as faces."""

RELATIVE_MIN_FACE = 0.4
"""Hits narrower than this fraction of the largest face are ignored: in a selfie they are
either false hits in the background or far-away strangers, and neither should change the crop."""

CROP_FACTOR = 2.5
"""Side of the square crop as a multiple of the face box. The Haar box spans brows to chin, so
2.5x keeps hair, ears, chin and a little of the shoulders: the framing DreamBooth learns from."""

HEADROOM = 0.1
"""The crop centre sits this fraction of the face height above the face centre: the head reaches
further above the Haar box (hair) than below it (chin)."""

_detect_lock = threading.Lock()
"""One classifier is shared by the intake threads; OpenCV does not promise that concurrent
detectMultiScale calls on one CascadeClassifier are safe, and a detection takes milliseconds."""


@functools.cache
def _cascade() -> cv2.CascadeClassifier:
    """Load the cascade once per process; parsing the XML takes longer than a detection."""
    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(
            "This OpenCV build has no Haar cascades (OpenCV 5 moved them out); "
            "install opencv-python-headless<5 as requirements.txt asks."
        )
    from cv2 import data  # loaded with cv2, but cv2's stubs do not declare it

    path = os.path.join(data.haarcascades, CASCADE_FILE)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's face cascade could not be loaded from {path}")
    logger.debug("loaded face cascade from %s", path)
    return cascade


def warm_up(threads: int | None = None) -> None:
    """Load the cascade now rather than on the first photo; `threads`: OpenCV's thread pool size."""
    if threads is not None:
        cv2.setNumThreads(threads)
    _cascade()


def detect_faces(image: Image.Image, original_size: tuple[int, int], *, min_face_px: int = MIN_FACE_PX) -> list[Box]:
    """Find frontal faces in `image`, largest first, as boxes in `original_size` coordinates.

    `image` may be a reduced decode of the original (JPEG draft mode); boxes are scaled back so
    callers always reason in the photo's real pixels. `min_face_px`: the smallest face looked for,
    at detection scale.
    """
    gray_full = image.convert("L")
    scale = min(1.0, DETECT_LONG_SIDE / max(gray_full.size))
    small_size = (max(1, round(gray_full.width * scale)), max(1, round(gray_full.height * scale)))
    small = gray_full.resize(small_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = cv2.equalizeHist(np.asarray(small))
    with _detect_lock:
        found = _cascade().detectMultiScale(
            gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBOURS, minSize=(min_face_px, min_face_px)
        )
    fx = original_size[0] / small_size[0]
    fy = original_size[1] / small_size[1]
    boxes = [
        (round(x * fx), round(y * fy), round(w * fx), round(h * fy)) for x, y, w, h in np.asarray(found).reshape(-1, 4)
    ]
    boxes.sort(key=lambda b: b[2] * b[3], reverse=True)
    if boxes:
        smallest_kept = boxes[0][2] * RELATIVE_MIN_FACE
        boxes = [b for b in boxes if b[2] >= smallest_kept]
    return boxes


def crop_around_face(face: Box, size: tuple[int, int]) -> Box:
    """A square around `face`, a little above its centre, kept inside an image of `size`.

    The square shrinks to the image's short side when the face is large in frame, and slides
    (rather than shrinks) when the face is near an edge, so the output is always a full square.
    """
    width, height = size
    x, y, w, h = face
    side = min(width, height, max(1, math.ceil(CROP_FACTOR * max(w, h))))
    cx = x + w / 2
    cy = y + h / 2 - HEADROOM * h
    left = min(max(0, round(cx - side / 2)), width - side)
    top = min(max(0, round(cy - side / 2)), height - side)
    return left, top, side, side


def centre_square(size: tuple[int, int]) -> Box:
    """The largest centred square: the framing used when there is no single face to frame."""
    width, height = size
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side
