"""The ByteTrack fallback: stable ids across detector runs, stream-time track ending."""

from __future__ import annotations

import numpy as np

from daemon.records import Detections, Frame
from daemon.tracking.bytetrack import ByteTrackTracker

IMG = np.zeros((432, 768, 3), np.uint8)


def dets(*boxes, conf=0.9) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), conf, np.float32))


def test_ids_stable_while_walking_and_ended_after_loss():
    t = ByteTrackTracker(lost_after_s=1.0, interval_s=0.5)
    ids = []
    for k in range(6):  # two people walking slowly in opposite directions
        f = Frame("c", k * 5, k * 0.5, 0.0, IMG)
        u = t.update(f, dets([100 + 4 * k, 50, 160 + 4 * k, 300], [500 - 4 * k, 60, 560 - 4 * k, 310]))
        ids.append(tuple(p.track_id for p in u.people))
        assert u.ended == ()
    assert len(set(ids[1:])) == 1 and len(ids[-1]) == 2
    assert t.active == 2
    # Between detector runs the tracker has nothing to say.
    assert t.update(Frame("c", 31, 3.1, 0.0, IMG), None) is None
    # Person 2 disappears; after lost_after_s of stream time their track ends.
    ended = []
    for k in range(6, 10):
        u = t.update(Frame("c", k * 5, k * 0.5, 0.0, IMG), dets([100 + 4 * k, 50, 160 + 4 * k, 300]))
        ended += u.ended
    assert ended == [ids[-1][1]]
    assert t.active == 1
    last = Frame("c", 50, 5.0, 0.0, IMG)
    assert t.finish(last).ended == (ids[-1][0],)
    assert t.finish(last) is None


def test_reports_detector_boxes_and_scores():
    t = ByteTrackTracker()
    box = [10, 20, 60, 220]
    u = t.update(Frame("c", 0, 0.0, 0.0, IMG), dets(box, conf=0.77))
    assert np.allclose(u.people[0].bbox, box)
    assert abs(u.people[0].score - 0.77) < 1e-6
