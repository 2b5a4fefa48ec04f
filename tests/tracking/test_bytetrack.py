"""The CPU tracker: ByteTrack association on detector frames, median-flow following in between."""

from __future__ import annotations

import numpy as np

from daemon.records import Detections, Frame
from daemon.tracking.bytetrack import ByteTrackTracker
from daemon.tracking.follow import FlowResult, MedianFlow

H, W = 240, 480
RNG = np.random.default_rng(3)
PEOPLE = [(RNG.random((90, 30, 3)) * 255).astype(np.uint8) for _ in range(3)]


def frame(index: int, *people: tuple[int, float, float]) -> Frame:
    """People as (texture index, x, y) textured boxes of 30 x 90 px on a grey floor; later in front."""
    img = np.full((H, W, 3), 120, np.uint8)
    for k, x, y in people:
        x, y = int(round(x)), int(round(y))
        img[y:y + 90, max(x, 0):min(x + 30, W)] = PEOPLE[k][:min(90, H - y), max(0, -x):min(30, W - x)]
    return Frame("cam", index, index / 10, index / 10, img)


def seen(*people: tuple[int, float, float], conf: float = 0.9) -> Detections:
    boxes = np.array([[x, y, x + 30, y + 90] for _, x, y in people], np.float32).reshape(-1, 4)
    return Detections(boxes, np.full(len(boxes), conf, np.float32))


class Frozen(MedianFlow):
    """A follower that never moves anything: the tracker as it was before following."""

    def advance(self, image, boxes, in_front=None):
        super().advance(image, boxes, in_front)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        return FlowResult(boxes.copy(), np.ones(len(boxes), bool), np.ones(len(boxes)))


def walk(tracker, *, speed: float = 7.0, every: int = 5, frames: int = 31):
    """One person walking right ``speed`` px per frame; the detector runs every ``every`` frames."""
    out = []
    for i in range(frames):
        who = (0, 20 + speed * i, 80)
        out.append(tracker.update(frame(i, who), seen(who) if i % every == 0 else None))
    return out


def test_one_id_for_a_walker_who_moves_more_than_their_width_between_detections():
    updates = walk(ByteTrackTracker())  # 35 px between detector runs; the box is 30 px wide
    ids = {p.track_id for u in updates for p in u.people}
    assert ids == {1}
    # Reported on every frame, where the person is (not where the detector last saw them).
    assert all(len(u.people) == 1 for u in updates)
    assert abs(updates[23].people[0].bbox[0] - (20 + 7 * 23)) < 2.0
    assert all(not u.ended for u in updates)


def test_without_following_the_same_walker_is_broken_into_new_tracks():
    """The check above can fail: a tracker that does not follow loses the walker at every run."""
    updates = walk(ByteTrackTracker(follower=Frozen()))
    assert len({p.track_id for u in updates for p in u.people}) > 1


def test_a_new_track_is_tentative_until_the_detector_sees_it_again():
    t = ByteTrackTracker()
    who = (0, 100, 80)
    first = t.update(frame(0, who), seen(who))
    assert [(p.track_id, p.confirmed) for p in first.people] == [(1, False)]
    assert t.wants_detection  # confirm soon
    second = t.update(frame(1, who), seen(who))
    assert [(p.track_id, p.confirmed) for p in second.people] == [(1, True)]
    assert not t.wants_detection


def test_a_one_off_detection_is_dropped_silently():
    t = ByteTrackTracker()
    ghost = (1, 300, 60)
    t.update(frame(0, ghost), seen(ghost, conf=0.5))
    u = t.update(frame(1), seen())  # the detector does not see it again
    assert u.people == () and u.ended == (1,)
    assert t.active == 0


def test_a_confirmed_track_ends_after_two_missed_detector_runs():
    t = ByteTrackTracker()
    who = (0, 100, 80)
    for i in range(2):
        t.update(frame(i, who), seen(who))
    hidden = t.update(frame(2, who), seen())  # missed once: still there, not reported
    assert hidden.people == () and hidden.ended == ()
    gone = t.update(frame(3, who), seen())
    assert gone.ended == (1,)


def test_a_box_around_two_people_does_not_take_either_identity():
    """Crossing walkers: the detector returns one wide box around both for a moment."""
    t = ByteTrackTracker()
    a, b = (0, 100, 80), (1, 150, 80)
    for i in range(2):
        t.update(frame(i, a, b), seen(a, b))
    both = Detections(np.array([[100, 80, 180, 170]], np.float32), np.array([0.9], np.float32))
    u = t.update(frame(2, a, b), both)
    assert u.people == () and u.ended == ()  # neither is given the box; nobody new starts from it
    u = t.update(frame(3, a, b), seen(a, b))
    assert sorted(p.track_id for p in u.people) == [1, 2]
    assert {tuple(np.round(p.bbox).astype(int)) for p in u.people} == {(100, 80, 130, 170), (150, 80, 180, 170)}


def test_finish_ends_every_track():
    t = ByteTrackTracker()
    who = (0, 100, 80)
    t.update(frame(0, who), seen(who))
    last = frame(1, who)
    assert t.finish(last).ended == (1,)
    assert t.finish(last) is None

