"""ByteTrack fallback tracker (ultralytics' own implementation), for CPU-only boxes.

It associates detector boxes between detector runs; positions only update on frames where the
detector ran. A track that goes unseen for ``lost_after_s`` of stream time ends.

Example:
    >>> import numpy as np
    >>> from daemon.records import Detections, Frame
    >>> t = ByteTrackTracker(lost_after_s=1.0, interval_s=0.5)
    >>> f = Frame("hall", 0, 0.0, 0.0, np.zeros((100, 100, 3), np.uint8))
    >>> u = t.update(f, Detections(np.array([[10, 10, 30, 60]], np.float32), np.array([0.9], np.float32)))
    >>> [p.track_id for p in u.people]
    [1]
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from daemon._ultralytics import ultralytics_offline
from daemon.config import ByteTrackConfig
from daemon.records import Detections, Frame, TrackedPerson, TrackUpdate


class ByteTrackTracker:
    """Wraps ``ultralytics.trackers.byte_tracker.BYTETracker`` with stream-time track ending."""

    def __init__(self, cfg: ByteTrackConfig | None = None, *, lost_after_s: float = 2.0, interval_s: float = 0.5):
        ultralytics_offline()
        from ultralytics.trackers.byte_tracker import BYTETracker

        cfg = cfg or ByteTrackConfig()
        # ByteTrack counts lost time in update calls; we call it once per detector run.
        updates_per_lost = max(1, math.ceil(lost_after_s / max(interval_s, 1e-3)))
        args = SimpleNamespace(
            track_high_thresh=cfg.track_high_thresh,
            track_low_thresh=cfg.track_low_thresh,
            new_track_thresh=cfg.new_track_thresh,
            track_buffer=updates_per_lost,
            match_thresh=cfg.match_thresh,
            fuse_score=cfg.fuse_score,
        )
        self._tracker = BYTETracker(args)
        self.lost_after_s = lost_after_s
        self._last_seen: dict[int, float] = {}

    @property
    def active(self) -> int:
        return len(self._last_seen)

    def update(self, frame: Frame, detections: Detections | None) -> TrackUpdate | None:
        if detections is None:
            return None
        from ultralytics.engine.results import Boxes

        n = len(detections)
        data = np.zeros((n, 6), np.float32)
        data[:, :4] = detections.xyxy
        data[:, 4] = detections.confidence
        rows = self._tracker.update(Boxes(data, frame.image.shape[:2]), frame.image)
        # Report the matched detector box (not the Kalman state, which lags fast walkers).
        people = tuple(
            TrackedPerson(
                track_id=int(r[4]),
                bbox=detections.xyxy[int(r[7])].copy(),
                score=float(detections.confidence[int(r[7])]),
            )
            for r in sorted(rows, key=lambda r: r[4])
        )
        for p in people:
            self._last_seen[p.track_id] = frame.pts_s
        ended = tuple(
            sorted(t for t, seen in self._last_seen.items() if frame.pts_s - seen > self.lost_after_s)
        )
        for t in ended:
            del self._last_seen[t]
        return TrackUpdate(frame, people, ended)

    def finish(self, frame: Frame | None) -> TrackUpdate | None:
        ended = tuple(sorted(self._last_seen))
        self._last_seen.clear()
        if frame is None or not ended:
            return None
        return TrackUpdate(frame, (), ended)
