"""Region logic: entry / exit / dwell of tracked people in polygon regions, with debounce.

A :class:`Zone` answers "is this person inside?" for one polygon and anchor; :class:`RegionLogic`
keeps, per track and zone, a small debounced state machine and emits
:class:`~daemon.events.RegionTransition` records.

A change of state (outside → inside or back) must persist for ``debounce_s`` of stream time
before it is reported; it is then reported at the frame where it first appeared, so debounce
delays the event but not its timestamp. A track that ends while inside exits with
``reason="track_lost"`` at its last sighting.

Example:
    >>> import numpy as np
    >>> from daemon.config import RegionConfig
    >>> from daemon.records import Frame, TrackedPerson, TrackUpdate
    >>> logic = RegionLogic("hall", [RegionConfig(id="table",
    ...     polygon=[[0, 0], [100, 0], [100, 100], [0, 100]])], debounce_s=0.0)
    >>> img = np.zeros((200, 200, 3), np.uint8)
    >>> p = TrackedPerson(1, np.array([40, 20, 60, 80.0]), 0.9)
    >>> [t.type for t in logic.update(TrackUpdate(Frame("hall", 0, 0.0, 0.0, img), (p,)))]
    ['entry']
    >>> logic.update(TrackUpdate(Frame("hall", 5, 0.5, 0.5, img), (p,)))
    []
    >>> [(t.type, t.reason, t.dwell_s) for t in logic.update(TrackUpdate(Frame("hall", 9, 0.9, 0.9, img), (), (1,)))]
    [('exit', 'track_lost', 0.5)]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from daemon.config import RegionConfig
from daemon.events import RegionTransition
from daemon.records import Frame, TrackedPerson, TrackUpdate


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Vectorised even-odd test of (N,2) points against an (M,2) polygon; boundary counts inside.

    Example:
        >>> square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
        >>> points_in_polygon(np.array([[5, 5], [15, 5], [10, 5]], float), square).tolist()
        [True, False, True]
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (N,1)
    x1, y1 = poly[:, 0], poly[:, 1]  # (M,)
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    # Crossing test for a horizontal ray to the right.
    straddles = (y1 <= y) != (y2 <= y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    inside = np.count_nonzero(straddles & (x < x_cross), axis=1) % 2 == 1
    # Points on an edge are inside (a person standing on the line is in the region).
    ex, ey = x2 - x1, y2 - y1
    cross = ex * (y - y1) - ey * (x - x1)
    dot = (x - x1) * ex + (y - y1) * ey
    on_edge = (np.abs(cross) <= 1e-9 * (np.abs(ex) + np.abs(ey) + 1)) & (dot >= 0) & (dot <= ex * ex + ey * ey)
    return inside | on_edge.any(axis=1)


def mask_footprint(mask: np.ndarray) -> tuple[float, float] | None:
    """Centre of a mask's lowest pixels (its footprint on the floor), or None for an empty mask.

    Example:
        >>> m = np.zeros((10, 10), bool); m[2:8, 3:6] = True
        >>> mask_footprint(m)
        (4.0, 7.0)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    bottom = int(rows[-1])
    cols = np.flatnonzero(mask[bottom])
    return float(cols.mean()), float(bottom)


class Zone:
    """One region polygon with its anchor rule."""

    def __init__(self, cfg: RegionConfig, index: int | None = None):
        self.id = cfg.id
        self.index = index  # position in the camera's region list (TrackedPerson.overlaps order)
        self.anchor = cfg.anchor
        self.min_overlap = cfg.min_overlap
        self.polygon = np.asarray(cfg.polygon, dtype=np.float64)
        self._mask: np.ndarray | None = None
        self._integral: np.ndarray | None = None

    def mask(self, width: int, height: int) -> np.ndarray:
        """The polygon rasterised as an HxW bool image (cached per frame size)."""
        if self._mask is None or self._mask.shape != (height, width):
            m = np.zeros((height, width), np.uint8)
            cv2.fillPoly(m, [np.round(self.polygon).astype(np.int32)], 1)
            self._mask = m.astype(bool)
            self._integral = cv2.integral(m)
        return self._mask

    def bbox_overlap(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Fraction of each (N,4) xyxy box's area inside the polygon, vectorised via an integral image."""
        self.mask(width, height)
        ii = self._integral
        b = np.round(np.asarray(boxes, np.float64)).astype(np.int64)
        x1, x2 = np.clip(b[:, 0], 0, width), np.clip(b[:, 2], 0, width)
        y1, y2 = np.clip(b[:, 1], 0, height), np.clip(b[:, 3], 0, height)
        inside = ii[y2, x2] - ii[y1, x2] - ii[y2, x1] + ii[y1, x1]
        area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1)
        return inside / area

    def test(self, people: tuple[TrackedPerson, ...], anchors: np.ndarray, width: int, height: int) -> np.ndarray:
        """Which of ``people`` (with their (N,2) anchor points) are inside this zone."""
        if not people:
            return np.zeros(0, bool)
        if self.anchor in ("bottom_center", "center"):
            return points_in_polygon(anchors, self.polygon)
        if self.anchor == "bbox_overlap":
            boxes = np.stack([p.bbox for p in people])
            return self.bbox_overlap(boxes, width, height) >= self.min_overlap
        # mask_overlap: count inside the person's box only (the mask is empty outside it)
        region = self.mask(width, height)
        out = np.zeros(len(people), bool)
        for i, p in enumerate(people):
            if p.overlaps is not None and self.index is not None:  # measured by the tracker (SAM2: on the GPU)
                out[i] = p.overlaps[self.index] >= self.min_overlap
                continue
            if p.mask is None:
                continue
            x1, y1 = max(int(p.bbox[0]), 0), max(int(p.bbox[1]), 0)
            x2, y2 = int(np.ceil(p.bbox[2])), int(np.ceil(p.bbox[3]))
            crop = p.mask[y1:y2, x1:x2]
            area = np.count_nonzero(crop)
            out[i] = area > 0 and np.count_nonzero(crop & region[y1:y2, x1:x2]) / area >= self.min_overlap
        return out

    def anchor_points(self, people: tuple[TrackedPerson, ...]) -> np.ndarray:
        """(N,2) anchor point per person: the mask footprint when a mask is known, else from the box."""
        pts = np.zeros((len(people), 2))
        for i, p in enumerate(people):
            x1, y1, x2, y2 = (float(v) for v in p.bbox)
            if self.anchor == "center":
                pts[i] = ((x1 + x2) / 2, (y1 + y2) / 2)
                continue
            foot = p.footprint if p.footprint is not None else mask_footprint(p.mask) if p.mask is not None else None
            pts[i] = foot if foot is not None else ((x1 + x2) / 2, y2)
        return pts


def mask_outline(mask: np.ndarray, epsilon_px: float = 2.0) -> list[list[float]] | None:
    """The outline of a mask's largest blob as a simplified polygon [[x, y], ...] (None if empty).

    Example:
        >>> m = np.zeros((100, 100), bool); m[20:80, 30:60] = True
        >>> mask_outline(m)
        [[30.0, 20.0], [30.0, 79.0], [59.0, 79.0], [59.0, 20.0]]
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    poly = cv2.approxPolyDP(max(contours, key=cv2.contourArea), epsilon_px, True).reshape(-1, 2)
    return poly.astype(float).tolist()


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Pixel-edge box (x1, y1, x2, y2) of a mask, or None when empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


@dataclass(slots=True)
class _Sighting:
    """Where a person was on one frame (the mask is kept by reference, only used for events)."""

    frame: int
    pts_s: float
    wall_time: float
    bbox: tuple[float, float, float, float]
    anchor: tuple[float, float]
    score: float
    mask: np.ndarray | None

    @classmethod
    def of(cls, frame: Frame, person: TrackedPerson, anchor: np.ndarray) -> _Sighting:
        return cls(
            frame.index, frame.pts_s, frame.wall_time, tuple(float(v) for v in person.bbox),
            (float(anchor[0]), float(anchor[1])), float(person.score), person.mask,
        )


@dataclass(slots=True)
class _Presence:
    """Debounced inside/outside state of one track in one zone."""

    inside: bool = False
    entered: _Sighting | None = None
    candidate: bool | None = None
    candidate_since: _Sighting | None = None
    last: _Sighting | None = None


class RegionLogic:
    """Per-camera region state: feed it tracker updates, get entry/exit transitions."""

    def __init__(
        self, camera: str, regions: list[RegionConfig], *, debounce_s: float = 0.4, mask_polygon: bool = False
    ):
        self.camera = camera
        self.mask_polygon = mask_polygon
        self.zones = [Zone(r, k) for k, r in enumerate(regions)]
        self.debounce_s = debounce_s
        self._state: dict[tuple[int, str], _Presence] = {}

    def occupancy(self) -> dict[str, int]:
        """People currently (confirmed) inside each region."""
        counts = {z.id: 0 for z in self.zones}
        for (_, zone_id), st in self._state.items():
            counts[zone_id] += st.inside
        return counts

    def update(self, update: TrackUpdate) -> list[RegionTransition]:
        """Apply one tracker update; returns transitions in a stable order."""
        out: list[RegionTransition] = []
        frame = update.frame
        width, height = frame.size
        people = update.people
        anchors_by_kind: dict[bool, np.ndarray] = {}  # feet or centre: computed once per update
        for zone in self.zones:
            kind = zone.anchor == "center"
            if kind not in anchors_by_kind:
                anchors_by_kind[kind] = zone.anchor_points(people)
            anchors = anchors_by_kind[kind]
            inside = zone.test(people, anchors, width, height)
            for person, anchor, now_inside in zip(people, anchors, inside):
                st = self._state.setdefault((person.track_id, zone.id), _Presence())
                seen = _Sighting.of(frame, person, anchor)
                st.last = seen
                out.extend(self._observe(zone.id, person, st, bool(now_inside), seen))
        for track_id in update.ended:
            out.extend(self._end_track(track_id))
        return out

    def finish(self) -> list[RegionTransition]:
        """End every track (end of stream, shutdown)."""
        out: list[RegionTransition] = []
        for track_id in sorted({t for t, _ in self._state}):
            out.extend(self._end_track(track_id))
        return out

    def _observe(self, zone_id: str, person: TrackedPerson, st: _Presence, now_inside: bool, seen: _Sighting):
        if now_inside == st.inside:
            st.candidate = st.candidate_since = None
            return []
        if st.candidate is not now_inside:
            st.candidate, st.candidate_since = now_inside, seen
        since = st.candidate_since
        if seen.pts_s - since.pts_s + 1e-9 < self.debounce_s or not person.confirmed:
            # Not yet: debounce, or a new track the detector has not confirmed. The candidate
            # keeps its first frame, so the entry still reports when it began.
            return []
        st.candidate = st.candidate_since = None
        return [self._commit(zone_id, person.track_id, st, now_inside, since, "left_region")]

    def _commit(self, zone_id, track_id, st: _Presence, inside: bool, at: _Sighting, reason) -> RegionTransition:
        st.inside = inside
        if inside:
            st.entered = at
            return self._transition("entry", zone_id, track_id, at)
        dwell = at.pts_s - st.entered.pts_s if st.entered else 0.0
        st.entered = None
        return self._transition("exit", zone_id, track_id, at, dwell_s=dwell, reason=reason)

    def _end_track(self, track_id: int) -> list[RegionTransition]:
        out = []
        for zone in self.zones:
            st = self._state.pop((track_id, zone.id), None)
            if st is None or not st.inside:
                continue
            if st.candidate is False and st.candidate_since is not None:
                # Seen outside before being lost, not yet debounced: it left.
                out.append(self._commit(zone.id, track_id, st, False, st.candidate_since, "left_region"))
            else:
                out.append(self._commit(zone.id, track_id, st, False, st.last, "track_lost"))
        return out

    def _transition(self, kind, zone_id, track_id, at: _Sighting, **extra) -> RegionTransition:
        return RegionTransition(
            type=kind, camera=self.camera, region=zone_id, track_id=track_id, frame=at.frame,
            pts_s=at.pts_s, wall_time=at.wall_time, bbox=at.bbox, anchor=at.anchor, score=at.score,
            mask_bbox=None if at.mask is None else mask_box(at.mask),
            mask_polygon=mask_outline(at.mask) if self.mask_polygon and at.mask is not None else None,
            **extra,
        )
