"""Median-flow box following: moves each person's box by the image motion inside it, frame to frame.

Between detector runs nothing else says where people are. :class:`MedianFlow` samples a grid of
points on the middle of each box (the torso and legs, little background), tracks them into the
next frame with OpenCV's pyramidal Lucas–Kanade, tracks them back again and keeps the points that
return to where they started (forward–backward error, Kalal et al. 2010). The box moves by the
median displacement of those points and scales by the median change of their pairwise
distances. A box whose points mostly fail (occlusion, the person left the frame, motion blur) is
reported as not followed: the tracker then waits for the detector instead of guessing.

One grey, downscaled image per frame serves every box, and all boxes' points go through a
single forward and a single backward LK call. With nobody to follow no grey image is made: the
previous frame is kept as it is and converted only when someone appears.

Example: a textured patch moving 3 px right and 2 px down per frame.
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> texture = (rng.random((60, 40)) * 255).astype(np.uint8)
    >>> def frame(dx, dy):
    ...     img = np.full((240, 320, 3), 90, np.uint8)
    ...     img[100 + dy:160 + dy, 100 + dx:140 + dx] = texture[..., None]
    ...     return img
    >>> flow = MedianFlow()
    >>> flow.advance(frame(0, 0), np.zeros((0, 4)))
    FlowResult(boxes=array([], shape=(0, 4), dtype=float64), ok=array([], dtype=bool), quality=array([], dtype=float64))
    >>> r = flow.advance(frame(3, 2), np.array([[100.0, 100, 140, 160]]))
    >>> r.boxes.round().tolist(), r.ok.tolist()
    ([[103.0, 102.0, 143.0, 162.0]], [True])
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import cv2
import numpy as np

from daemon.geometry import border_margin


@dataclass(frozen=True, slots=True)
class FlowResult:
    """Boxes moved into the new frame (N,4 xyxy, input order), whether each was followed, and how well (0–1)."""

    boxes: np.ndarray
    ok: np.ndarray
    quality: np.ndarray


class MedianFlow:
    """Follows boxes across consecutive frames of one camera (module doc). Not thread-safe.

    ``max_side``: frames are downscaled so their longer side is at most this (speed; people stay
    tens of pixels tall). ``grid``: points per box along x and y. ``fb_max_px``: a point whose
    forward–backward error exceeds this (in full-resolution pixels) is dropped. ``min_points``:
    fraction of a box's points that must survive for the box to count as followed.
    """

    def __init__(
        self,
        *,
        max_side: int = 640,
        grid: tuple[int, int] = (5, 9),
        win: int = 11,
        levels: int = 3,
        fb_max_px: float = 2.0,
        min_points: float = 0.3,
        max_scale_step: float = 0.1,
    ):
        self.max_side = max_side
        self.grid = grid
        self.win = (win, win)
        self.levels = levels
        self.fb_max_px = fb_max_px
        self.min_points = min_points
        self.max_scale_step = max_scale_step
        self._criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03)
        self._prev_image: np.ndarray | None = None  # the previous frame, as given
        self._prev: np.ndarray | None = None  # its grey copy, once made
        self._scale = 1.0
        self._size: tuple[int, int] | None = None
        # Where the points sit inside a unit box: the middle 60 % of the width (the body, not the
        # background beside it), 10–90 % of the height.
        gx = np.linspace(0.2, 0.8, grid[0])
        gy = np.linspace(0.1, 0.9, grid[1])
        self._unit = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        self._pairs = np.triu_indices(len(self._unit), 1)  # point pairs whose distances give the scale

    def reset(self) -> None:
        """Forget the previous frame (after a stream discontinuity)."""
        self._prev_image = self._prev = None

    def _sized(self, image: np.ndarray) -> None:
        """Take the frame size; a new size forgets the previous frame."""
        h, w = image.shape[:2]
        if self._size != (w, h):
            self._size = (w, h)
            self._scale = min(1.0, self.max_side / max(w, h))
            self.reset()

    def _grey(self, image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        if self._scale < 1.0:
            w, h = self._size
            grey = cv2.resize(grey, (round(w * self._scale), round(h * self._scale)), interpolation=cv2.INTER_AREA)
        return grey

    def advance(self, image: np.ndarray, boxes: np.ndarray, in_front: list[np.ndarray] | None = None) -> FlowResult:
        """Take the next frame; move ``boxes`` (N,4 xyxy, positions on the previous frame) onto it.

        ``in_front[i]`` (M,4 xyxy, optional) are boxes of people standing in front of person ``i``:
        points of box ``i`` that fall inside them see the person in front, not person ``i``, and are
        not used (when two people cross, the one behind would otherwise be carried along by the one
        in front). The first frame (or the first after :meth:`reset` or a size change) follows
        nothing.
        """
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        n = len(boxes)
        self._sized(image)
        prev_image, prev = self._prev_image, self._prev
        self._prev_image, self._prev = image, None
        if prev_image is None or n == 0:
            return FlowResult(boxes.copy(), np.zeros(n, bool), np.zeros(n))
        if prev is None:
            prev = self._grey(prev_image)
        grey = self._prev = self._grey(image)
        s = self._scale
        k = len(self._unit)
        wh = boxes[:, 2:] - boxes[:, :2]
        pts = (boxes[:, None, :2] + self._unit[None] * wh[:, None]) * s  # (n, k, 2) downscaled
        p0 = pts.reshape(-1, 1, 2).astype(np.float32)
        lk = dict(winSize=self.win, maxLevel=self.levels, criteria=self._criteria)
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(prev, grey, p0, None, **lk)
        p0b, st2, _ = cv2.calcOpticalFlowPyrLK(grey, prev, p1, None, **lk)
        fb = np.linalg.norm(p0b - p0, axis=2).reshape(n, k) / s
        good = (st1.reshape(n, k) == 1) & (st2.reshape(n, k) == 1) & (fb <= self.fb_max_px)
        src = p0.reshape(n, k, 2) / s
        for i, front in enumerate(in_front or ()):
            front = np.asarray(front, np.float64).reshape(-1, 4)
            if len(front):
                x, y = src[i, :, 0:1], src[i, :, 1:2]
                covered = ((x >= front[:, 0]) & (x <= front[:, 2]) & (y >= front[:, 1]) & (y <= front[:, 3])).any(axis=1)
                good[i] &= ~covered
        dst = p1.reshape(n, k, 2) / s
        quality = good.mean(axis=1)
        # The better half by forward-backward error, as median flow does: outliers on the
        # background or on a passer-by rarely make it into the median. All boxes at once: rejected
        # points are NaN and every median is a nanmedian over the box's points.
        ok = good.sum(axis=1) >= max(4, self.min_points * k)
        fb_good = np.where(good, fb, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: boxes not followed
            keep = good & (fb <= np.nanmedian(fb_good, axis=1, keepdims=True))
            move = np.where(keep[..., None], dst - src, np.nan)
            d = np.nanmedian(move, axis=1)  # (n, 2)
            scale = self._scale_change(np.where(keep[..., None], src, np.nan), np.where(keep[..., None], dst, np.nan))
        ok &= np.isfinite(d).all(axis=1)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + np.nan_to_num(d)
        # A box cut by a border shows only part of the person: the points' spread changes as more
        # or less of them is in view, not as they come nearer, so that axis is not scaled.
        touch = self._touching(boxes)
        axis_scale = np.where(touch[:, :2] | touch[:, 2:], 1.0, scale[:, None])
        half = wh * axis_scale / 2
        out = np.where(ok[:, None], np.hstack([centre - half, centre + half]), boxes)
        return FlowResult(self._pin_to_border(touch, out, ok), ok, quality)

    def _pin_to_border(self, touching: np.ndarray, after: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """A box cut off by the frame border keeps that side on the border.

        The person goes on beyond the edge: someone walking in from the bottom shows more of
        themselves each frame while their (unseen) feet stay below the frame, so the box must grow
        from the border, not slide away from it. ``touching`` (N,4): the sides of each box, before
        it moved, that were on the border.
        """
        w, h = self._size
        limits = np.array([0.0, 0.0, w, h])
        pinned = np.where(touching & ok[:, None], limits, after)
        # Sides not on the border stay inside the frame.
        return np.clip(pinned, 0.0, limits[[2, 3, 2, 3]])

    def _touching(self, boxes: np.ndarray) -> np.ndarray:
        """(N,4) True for each box side on the frame border (within :func:`border_margin`)."""
        w, h = self._size
        limits = np.array([0.0, 0.0, w, h])
        margin = np.array([border_margin(w), border_margin(h)] * 2)
        return np.abs(boxes - limits) <= margin

    def _scale_change(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n,) median ratio of pairwise point distances after/before per box ((n,k,2) points, NaN
        for unused ones), clamped per frame; 1 where it cannot be measured."""
        i, j = self._pairs
        da = np.linalg.norm(a[:, i] - a[:, j], axis=2)
        db = np.linalg.norm(b[:, i] - b[:, j], axis=2)
        ratio = np.nanmedian(np.where(da > 1e-3, db / da, np.nan), axis=1)
        ratio = np.where(np.isfinite(ratio), ratio, 1.0)
        return np.clip(ratio, 1 - self.max_scale_step, 1 + self.max_scale_step)
