"""Cheap motion detection: is anything moving on this frame? (to skip the detector when nothing is).

A frame is shrunk to a small grey image (``height`` rows; nearest-neighbour sampling, then a 3x3
blur, which together cost far less than a smooth resize), compared with a running-average
background (``cv2.accumulateWeighted``), and the pixels that differ by more than ``threshold``
grey levels are grouped into blobs (``cv2.connectedComponentsWithStats``). Blobs smaller than
``min_area`` (a share of the frame) are noise. The background then takes ``alpha`` of the new
frame, so whatever stops moving fades into it within a few frames.

When more than ``global_change`` of the frame changes at once (lights switched, the camera's
exposure jumped or it was moved) the background is reset to this frame and the frame counts as
moving: one detector run settles what is there.

This is the idea Frigate uses in front of its detector; what to do with the answer (run the
detector only on moving frames while nobody is tracked) is the pipeline's decision.

Example:
    >>> import numpy as np
    >>> md = MotionDetector()
    >>> room = np.full((432, 768, 3), 90, np.uint8)
    >>> md(room).moving, md(room).moving  # the first frame only sets the background
    (False, False)
    >>> walker = room.copy(); walker[150:400, 300:360] = 200
    >>> m = md(walker)
    >>> m.moving, m.boxes.astype(int).tolist()
    (True, [[295, 144, 367, 410]])
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class Motion:
    """Motion on one frame: whether anything moves, the changed share, and blobs (xyxy, frame pixels)."""

    moving: bool
    changed: float
    boxes: np.ndarray
    global_change: bool = False


class MotionDetector:
    """Frame differencing against a running-average background on a small grey copy (module doc).

    One per camera (it keeps that camera's background); not thread-safe.
    """

    def __init__(
        self,
        *,
        height: int = 120,
        threshold: int = 25,
        min_area: float = 0.002,
        alpha: float = 0.2,
        global_change: float = 0.5,
    ):
        if not (8 <= height and 1 <= threshold <= 255 and 0 <= min_area < 1 and 0 < alpha <= 1 and 0 < global_change <= 1):
            raise ValueError("motion: height >= 8, 1 <= threshold <= 255, 0 <= min_area < 1, 0 < alpha <= 1, "
                             "0 < global_change <= 1")
        self.height, self.threshold, self.min_area, self.alpha = height, threshold, min_area, alpha
        self.global_change = global_change
        self._background: np.ndarray | None = None
        self._kernel = np.ones((3, 3), np.uint8)

    def reset(self) -> None:
        """Forget the background (e.g. after a reconnect): the next frame sets it again."""
        self._background = None

    def _small_grey(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        size = (max(1, round(w * self.height / h)), self.height)
        small = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        if small.ndim == 3:
            small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        return cv2.GaussianBlur(small, (3, 3), 0)

    def __call__(self, image_bgr: np.ndarray) -> Motion:
        """Motion on this frame (HxWx3 BGR or HxW grey), against the frames before it."""
        small = self._small_grey(image_bgr)
        none = np.zeros((0, 4), np.float32)
        if self._background is None or self._background.shape != small.shape:
            self._background = small.astype(np.float32)
            return Motion(False, 0.0, none)
        diff = cv2.absdiff(small, cv2.convertScaleAbs(self._background))
        mask = cv2.dilate((diff > self.threshold).view(np.uint8), self._kernel)
        changed = float(np.count_nonzero(mask)) / mask.size
        if changed > self.global_change:
            self._background = small.astype(np.float32)
            h, w = image_bgr.shape[:2]
            return Motion(True, changed, np.array([[0, 0, w, h]], np.float32), global_change=True)
        cv2.accumulateWeighted(small, self._background, self.alpha)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        blobs = stats[1:n]
        blobs = blobs[blobs[:, cv2.CC_STAT_AREA] >= self.min_area * mask.size]
        if len(blobs) == 0:
            return Motion(False, changed, none)
        scale = image_bgr.shape[0] / small.shape[0]
        x, y = blobs[:, cv2.CC_STAT_LEFT], blobs[:, cv2.CC_STAT_TOP]
        boxes = np.stack([x, y, x + blobs[:, cv2.CC_STAT_WIDTH], y + blobs[:, cv2.CC_STAT_HEIGHT]], axis=1)
        return Motion(True, changed, (boxes * scale).astype(np.float32))
