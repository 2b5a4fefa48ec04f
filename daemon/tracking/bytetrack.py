"""The CPU tracker: ByteTrack association on detector frames, median-flow following in between.

The detector runs every few frames; people walk further than their own width between runs, so
associating detections with where people *were* (or with a constant-velocity guess) fails when
they turn, stop or cross. This tracker moves every person's box on every frame by the image motion
inside it (:class:`~daemon.tracking.follow.MedianFlow`), so region logic sees every frame and the
next detector run is associated with where people are *now*:

1. Each frame: follow every live track. A track the follower loses (occlusion, the person left the
   frame) is not reported on that frame and asks for a detector run (:attr:`wants_detection`).
2. Detector frames, ByteTrack's two stages: confident detections are matched to every track by
   IoU (score-fused, ``match_thresh``), then low-confidence detections (between
   ``track_low_thresh`` and ``track_high_thresh``) to the tracks still unmatched, at IoU ≥ 0.5. A
   matched track takes the detector's box.
3. A confident detection that matches nothing starts a *tentative* track (reported with
   ``confirmed=False``) unless it covers someone already tracked (one box around two people who
   cross); the next detector run that sees it again confirms it, one that misses it drops it
   silently. A confirmed track missed by one detector run is hidden (still followed, not
   reported); missed by two, or lost by the follower and then missed, it ends.

Tracks end fast on purpose: whether a new track is in fact a person seen before (after a crossing,
an occlusion) is decided in one place after every tracker, by
:class:`~daemon.tracking.identity.IdentityKeeper`, which also holds ends back for ``lost_after_s``.

Example: one person walking right 4 px per frame; the detector runs on frames 0, 5 and 10.
    >>> import numpy as np
    >>> from daemon.records import Detections, Frame
    >>> rng = np.random.default_rng(0)
    >>> person = (rng.random((80, 30, 3)) * 255).astype(np.uint8)
    >>> def frame(i):
    ...     img = np.full((200, 300, 3), 100, np.uint8)
    ...     img[60:140, 20 + 4 * i:50 + 4 * i] = person
    ...     return Frame("hall", i, i / 10, i / 10, img)
    >>> def seen(i):
    ...     return Detections(np.array([[20 + 4 * i, 60, 50 + 4 * i, 140]], np.float32), np.array([0.9], np.float32))
    >>> t = ByteTrackTracker()
    >>> out = [t.update(frame(i), seen(i) if i % 5 == 0 else None) for i in range(11)]
    >>> [(u.people[0].track_id, u.people[0].confirmed) for u in out if u.people][:6:5]
    [(1, False), (1, True)]
    >>> out[3].people[0].bbox.round().tolist()  # followed, not detected, on frame 3
    [32.0, 60.0, 62.0, 140.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from daemon.config import ByteTrackConfig
from daemon.geometry import assign, box_intersection, box_iou, on_border
from daemon.records import Detections, Frame, TrackedPerson, TrackUpdate
from daemon.tracking.follow import MedianFlow


@dataclass(slots=True)
class _Track:
    id: int
    box: np.ndarray
    det_box: np.ndarray
    score: float
    det_index: int  # frame of the last detector match
    hits: int = 1
    misses: int = 0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre, px per frame
    followed: bool = True  # the follower (or the detector) placed the box on the latest frame
    lost_by_follower: bool = False

    @property
    def confirmed(self) -> bool:
        return self.hits >= 2

    @property
    def visible(self) -> bool:
        return self.followed and self.misses == 0


def in_front(boxes: np.ndarray) -> list[np.ndarray]:
    """For each (N,4) xyxy box, the indices of the boxes that overlap it and stand in front of it.

    On a camera looking down at a floor, whoever's feet are lower in the image is nearer.

    Example:
        >>> [f.tolist() for f in in_front(np.array([[0, 0, 10, 30], [5, 5, 15, 40], [50, 0, 60, 30]]))]
        [[1], [], []]
    """
    n = len(boxes)
    if n < 2:
        return [np.zeros(0, np.int64) for _ in range(n)]
    nearer = (box_intersection(boxes, boxes) > 0) & (boxes[None, :, 3] > boxes[:, None, 3])
    return [np.flatnonzero(row) for row in nearer]


def covers(box: np.ndarray, boxes: np.ndarray, fraction: float = 0.6) -> np.ndarray:
    """(M,) True where ``box`` covers at least ``fraction`` of each of ``boxes``' area.

    Example:
        >>> covers(np.array([0, 0, 20, 10]), np.array([[0, 0, 10, 10], [15, 0, 30, 10]])).tolist()
        [True, False]
    """
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return box_intersection(box, boxes)[0] / area >= fraction


def same_size(a: np.ndarray, b: np.ndarray, size: tuple[int, int], *, height: float = 1.33, area: float = 2.0) -> np.ndarray:
    """(N,M) True where box a[i] and b[j] have about the same height and area.

    When two people cross, the detector often returns one box around both: twice as wide as
    either person. Matching it to one of them would drag that person's box onto the other.
    Boxes cut off by the frame border (``size`` = width, height) grow and shrink as people walk
    in and out of view, so they are not compared.

    Example:
        >>> same_size(np.array([[5, 20, 15, 50]]), np.array([[5, 20, 16, 48], [5, 20, 30, 50], [5, 35, 15, 50]]), (100, 100)).tolist()
        [[True, False, False]]
        >>> same_size(np.array([[5, 80, 15, 100]]), np.array([[5, 40, 15, 100]]), (100, 100)).tolist()
        [[True]]
    """
    ha, hb = (a[:, 3] - a[:, 1])[:, None], (b[:, 3] - b[:, 1])[None, :]
    aa = ha * (a[:, 2] - a[:, 0])[:, None]
    ab = hb * (b[:, 2] - b[:, 0])[None, :]
    similar = (hb <= ha * height) & (ha <= hb * height) & (ab <= aa * area) & (aa <= ab * area)
    return similar | on_border(a, size)[:, None] | on_border(b, size)[None, :]


class ByteTrackTracker:
    """Per-camera tracker implementing :class:`daemon.tracking.base.Tracker` (module doc)."""

    MAX_GAP_FRAMES = 5  # frames skipped beyond this (or MAX_GAP_S of stream time) restart following
    MAX_GAP_S = 0.5

    def __init__(self, cfg: ByteTrackConfig | None = None, *, follower: MedianFlow | None = None):
        self.cfg = cfg or ByteTrackConfig()
        self.follower = follower or MedianFlow()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._last_index: int | None = None
        self._last_pts = 0.0

    @property
    def active(self) -> int:
        return len(self._tracks)

    @property
    def wants_detection(self) -> bool:
        """True when the follower lost someone (or a new track waits for confirmation)."""
        return any(t.lost_by_follower or not t.confirmed for t in self._tracks)

    def close(self) -> None:
        """Nothing outside the tracker to release."""

    def update(self, frame: Frame, detections: Detections | None) -> TrackUpdate:
        if self._last_index is not None and (frame.index - self._last_index > self.MAX_GAP_FRAMES
                                             or frame.pts_s - self._last_pts > self.MAX_GAP_S):
            # A long gap (a reconnect, a stall): flow across it is meaningless. A short one (a live
            # camera skipping a frame or two under load) the pyramid and the back check cope with.
            self.follower.reset()
        self._last_index, self._last_pts = frame.index, frame.pts_s
        self._follow(frame)
        ended: list[int] = []
        if detections is not None:
            ended = self._associate(detections, frame.index, frame.size)
        people = tuple(
            TrackedPerson(t.id, t.box.astype(np.float32), t.score, confirmed=t.confirmed)
            for t in self._tracks
            if t.visible
        )
        return TrackUpdate(frame, people, tuple(sorted(ended)))

    def finish(self, frame: Frame | None) -> TrackUpdate | None:
        ended = tuple(sorted(t.id for t in self._tracks))
        self._tracks.clear()
        self.follower.reset()
        if frame is None or not ended:
            return None
        return TrackUpdate(frame, (), ended)

    def _follow(self, frame: Frame) -> None:
        boxes = np.array([t.box for t in self._tracks], np.float64).reshape(-1, 4)
        front = in_front(boxes)
        moved = self.follower.advance(frame.image, boxes, [boxes[f] for f in front])
        h, w = frame.image.shape[:2]
        for t, box, ok, f in zip(self._tracks, moved.boxes, moved.ok, front):
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            if ok and 0 <= cx < w and 0 <= cy < h:
                t.box, t.followed = box, True
            elif len(f):
                # Hidden behind someone: keep walking at their pace, unreported, until the
                # detector sees them again.
                t.box = t.box + np.tile(t.velocity, 2)
                t.followed = False
            else:
                t.followed = False  # gone from view, or the follower failed: the detector decides
                t.lost_by_follower = True

    def _associate(self, det: Detections, index: int, size: tuple[int, int]) -> list[int]:
        cfg = self.cfg
        boxes, scores = det.xyxy.astype(np.float64), det.confidence.astype(np.float64)
        high = np.flatnonzero(scores >= cfg.track_high_thresh)
        low = np.flatnonzero((scores >= cfg.track_low_thresh) & (scores < cfg.track_high_thresh))
        tracks = self._tracks
        matched_track: set[int] = set()
        used_det: set[int] = set()

        def match(track_idx: list[int], det_idx: np.ndarray, limit: float, fuse: bool) -> None:
            if not track_idx or not len(det_idx):
                return
            tb = np.array([tracks[k].box for k in track_idx])
            iou = box_iou(tb, boxes[det_idx]) * same_size(tb, boxes[det_idx], size)
            sim = iou * scores[det_idx][None, :] if fuse else iou
            for r, c in assign(1.0 - sim, limit):
                if iou[r, c] <= 0:
                    continue
                t, d = tracks[track_idx[r]], int(det_idx[c])
                frames = max(1, index - t.det_index)
                v = ((boxes[d, :2] + boxes[d, 2:]) - (t.det_box[:2] + t.det_box[2:])) / 2 / frames
                t.velocity = v if t.hits == 1 else 0.5 * t.velocity + 0.5 * v
                t.box, t.det_box, t.det_index, t.score = boxes[d].copy(), boxes[d].copy(), index, float(scores[d])
                t.hits += 1
                t.misses = 0
                t.followed, t.lost_by_follower = True, False
                matched_track.add(track_idx[r])
                used_det.add(d)

        match(list(range(len(tracks))), high, cfg.match_thresh, cfg.fuse_score)
        rest = [k for k in range(len(tracks)) if k not in matched_track and tracks[k].confirmed]
        match(rest, low, 0.5, False)

        ended: list[int] = []
        keep: list[_Track] = []
        for k, t in enumerate(tracks):
            if k not in matched_track:
                t.misses += 1
                # Tentative: one miss drops it. Confirmed: a second miss, or a miss after the
                # follower lost them, ends it (IdentityKeeper may join it to a later track).
                if not t.confirmed or t.misses >= 2 or t.lost_by_follower:
                    ended.append(t.id)
                    continue
            keep.append(t)
        live = np.array([t.box for t in keep], np.float64).reshape(-1, 4)
        for d in high:
            if int(d) in used_det or scores[d] < cfg.new_track_thresh:
                continue
            if len(live) and covers(boxes[d], live).any():
                continue  # a box around people already tracked (two walkers crossing) is nobody new
            keep.append(_Track(self._next_id, boxes[d].copy(), boxes[d].copy(), float(scores[d]), index))
            self._next_id += 1
        self._tracks = keep
        return ended
