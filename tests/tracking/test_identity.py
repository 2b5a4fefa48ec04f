"""IdentityKeeper: one id per person through crossings and occlusions, whatever the tracker."""

from __future__ import annotations

import numpy as np

from daemon.records import Frame, TrackedPerson, TrackUpdate
from daemon.regions import RegionLogic
from daemon.config import RegionConfig
from daemon.tracking.identity import IdentityKeeper

H, W = 240, 640
RED, BLUE = (40, 40, 200), (200, 60, 30)  # BGR


def image(*people: tuple[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    img = np.full((H, W, 3), 128, np.uint8)
    for colour, box in people:
        x1, y1, x2, y2 = (int(v) for v in box)
        img[y1:y2, max(x1, 0):min(x2, W)] = colour
    return img


def box(x: float) -> np.ndarray:
    return np.array([x, 60, x + 40, 180], np.float32)


def step(keeper: IdentityKeeper, i: int, people=(), ended=(), colours=()):
    """Feed one update at 10 fps; ``people`` are (tracker id, x); colours paint them on the frame."""
    persons = tuple(TrackedPerson(t, box(x), 0.9) for t, x in people)
    img = image(*[(c, box(x)) for c, (_, x) in zip(colours, people)])
    u = keeper.update(TrackUpdate(Frame("c", i, i / 10, i / 10, img), persons, tuple(ended)))
    return {p.track_id: float(p.bbox[0]) for p in u.people}, u.ended


def test_two_walkers_crossing_keep_their_ids_when_the_tracker_loses_both():
    """A walks right, B walks left, at 8 px per frame; at the crossing the tracker ends both
    tracks and starts new ones on the far side. Their ids come from where each was heading."""
    keeper = IdentityKeeper(lost_after_s=2.0)
    ids = {}
    for i in range(10):
        ids, _ = step(keeper, i, [(1, 200 + 8 * i), (2, 400 - 8 * i)], colours=(RED, BLUE))
    a, b = sorted(ids, key=ids.get)  # A is on the left
    step(keeper, 10, ended=(1, 2))
    # Both reappear as new tracks 3 and 4 after 0.4 s, past each other.
    seen, ended = step(keeper, 14, [(4, 400 - 8 * 14), (3, 200 + 8 * 14)], colours=(BLUE, RED))
    assert ended == ()
    assert seen == {a: 200 + 8 * 14, b: 400 - 8 * 14}


def test_colour_tells_apart_two_people_who_stop_side_by_side():
    """Motion cannot decide (both stood still): the new tracks look like one or the other."""
    keeper = IdentityKeeper(lost_after_s=2.0)
    for i in range(6):
        ids, _ = step(keeper, i, [(1, 300), (2, 340)], colours=(RED, BLUE))
    red, blue = ids
    step(keeper, 6, ended=(1, 2))
    seen, _ = step(keeper, 8, [(3, 338), (4, 302)], colours=(RED, BLUE))  # swapped places
    assert seen == {red: 338, blue: 302}


def test_someone_far_from_where_a_missing_person_would_be_is_someone_new():
    keeper = IdentityKeeper(lost_after_s=2.0)
    for i in range(5):
        step(keeper, i, [(1, 100 + 5 * i)], colours=(RED,))
    step(keeper, 5, ended=(1,))
    seen, _ = step(keeper, 7, [(2, 560)], colours=(RED,))
    assert list(seen) == [2]


def test_an_end_waits_for_lost_after_s_from_the_last_sighting():
    keeper = IdentityKeeper(lost_after_s=1.0)
    step(keeper, 0, [(1, 100)])
    assert step(keeper, 1, ended=(1,)) == ({}, ())
    assert step(keeper, 9, []) == ({}, ())
    assert step(keeper, 11, []) == ({}, (1,))


def test_an_unconfirmed_track_that_ends_is_forgotten_at_once():
    keeper = IdentityKeeper(lost_after_s=5.0)
    u = keeper.update(TrackUpdate(Frame("c", 0, 0.0, 0.0, image()), (TrackedPerson(7, box(100), 0.4, confirmed=False),)))
    assert [p.confirmed for p in u.people] == [False]
    u = keeper.update(TrackUpdate(Frame("c", 1, 0.1, 0.1, image()), (), (7,)))
    assert u.ended == (1,)
    assert keeper.active == 0


def test_region_logic_sees_no_exit_and_entry_when_the_tracker_briefly_loses_someone():
    """End to end with region logic: a lost-and-found person inside a region is one visit."""
    keeper = IdentityKeeper(lost_after_s=2.0)
    logic = RegionLogic("c", [RegionConfig(id="r", polygon=[[0, 0], [640, 0], [640, 240], [0, 240]])], debounce_s=0.2)
    events = []
    for i in range(40):
        if 15 <= i < 22:  # occluded: nothing reported; the tracker ends it at 15
            people, ended = (), ((1,) if i == 15 else ())
        else:
            people, ended = ((1 if i < 15 else 2, 100 + 4 * i),), ()
        persons = tuple(TrackedPerson(t, box(x), 0.9) for t, x in people)
        u = keeper.update(TrackUpdate(Frame("c", i, i / 10, i / 10, image()), persons, ended))
        events += [(t.type, t.frame) for t in logic.update(u)]
    events += [(t.type, t.frame) for t in logic.finish()]
    assert events == [("entry", 0), ("exit", 39)]
