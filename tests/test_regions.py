"""Region logic: containment, anchors, debounce, entry/exit/dwell, track loss, occupancy."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.config import RegionConfig
from daemon.records import Frame, TrackedPerson, TrackUpdate
from daemon.regions import RegionLogic, Zone, mask_footprint, points_in_polygon

SQUARE = [[100, 100], [200, 100], [200, 200], [100, 200]]
IMG = np.zeros((300, 300, 3), np.uint8)
FPS = 10


def frame(i: int) -> Frame:
    return Frame("cam", i, i / FPS, 1_000.0 + i / FPS, IMG)


def person(tid: int, foot_x: float, foot_y: float, h: float = 60, mask=None) -> TrackedPerson:
    return TrackedPerson(tid, np.array([foot_x - 10, foot_y - h, foot_x + 10, foot_y], np.float32), 0.9, mask)


def run(logic: RegionLogic, steps: list[tuple[int, list[TrackedPerson], tuple[int, ...]]]):
    out = []
    for i, people, ended in steps:
        out += logic.update(TrackUpdate(frame(i), tuple(people), ended))
    return out


def logic(anchor="bottom_center", debounce_s=0.0, polygon=SQUARE, **kw) -> RegionLogic:
    return RegionLogic("cam", [RegionConfig(id="r", polygon=polygon, anchor=anchor, **kw)], debounce_s=debounce_s)


def test_points_in_polygon_vectorised_concave():
    # An L shape: the notch (150..200, 150..200) is outside.
    L = np.array([[100, 100], [200, 100], [200, 150], [150, 150], [150, 200], [100, 200]], float)
    pts = np.array([[120, 120], [175, 175], [125, 175], [175, 125], [99, 120], [150, 150], [200, 120]])
    assert points_in_polygon(pts, L).tolist() == [True, False, True, True, False, True, True]


def test_entry_then_exit_with_dwell():
    events = run(logic(), [(0, [person(1, 50, 150)], ()), (10, [person(1, 150, 150)], ()), (30, [person(1, 250, 150)], ())])
    assert [(e.type, e.frame, e.region, e.track_id) for e in events] == [("entry", 10, "r", 1), ("exit", 30, "r", 1)]
    assert events[1].reason == "left_region"
    assert events[1].dwell_s == pytest.approx(2.0)
    assert events[0].anchor == (150.0, 150.0)
    assert events[0].wall_time == pytest.approx(1001.0)


def test_first_appearance_inside_is_an_entry():
    events = run(logic(), [(5, [person(3, 150, 150)], ())])
    assert [(e.type, e.frame) for e in events] == [("entry", 5)]


def test_track_lost_inside_exits_at_last_sighting():
    L = logic()
    events = run(L, [(0, [person(1, 150, 150)], ()), (5, [person(1, 160, 150)], ()), (30, [], (1,))])
    assert [(e.type, e.frame, e.reason) for e in events] == [("entry", 0, None), ("exit", 5, "track_lost")]
    assert events[1].dwell_s == pytest.approx(0.5)
    assert L.occupancy() == {"r": 0}


def test_debounce_stops_boundary_storm_and_keeps_first_frame():
    # A person swaying across the right border every frame for 2 s, then stepping in for good.
    steps = [(i, [person(1, 199 if i % 2 else 201, 150)], ()) for i in range(20)]
    steps += [(i, [person(1, 150, 150)], ()) for i in range(20, 30)]
    events = run(logic(debounce_s=0.4), steps)
    assert [(e.type, e.frame) for e in events] == [("entry", 19)]  # inside from frame 19 on
    # Without debounce the same input storms.
    assert len(run(logic(debounce_s=0.0), steps)) >= 19


def test_debounced_exit_reports_when_it_began():
    steps = [(i, [person(1, 150, 150)], ()) for i in range(10)]
    steps += [(i, [person(1, 250, 150)], ()) for i in range(10, 20)]
    events = run(logic(debounce_s=0.5), steps)
    assert [(e.type, e.frame) for e in events] == [("entry", 0), ("exit", 10)]
    assert events[1].dwell_s == pytest.approx(1.0)


def test_lost_while_leaving_is_left_region():
    steps = [(i, [person(1, 150, 150)], ()) for i in range(10)] + [(10, [person(1, 250, 150)], ()), (11, [], (1,))]
    events = run(logic(debounce_s=0.5), steps)
    assert [(e.type, e.frame, e.reason) for e in events] == [("entry", 0, None), ("exit", 10, "left_region")]


def test_short_visit_under_debounce_is_ignored():
    steps = [(0, [person(1, 50, 150)], ()), (1, [person(1, 150, 150)], ()), (2, [person(1, 50, 150)], ())]
    assert run(logic(debounce_s=0.5), steps) == []


def test_multiple_people_and_regions_and_occupancy():
    L = RegionLogic(
        "cam",
        [RegionConfig(id="left", polygon=[[0, 0], [150, 0], [150, 300], [0, 300]]),
         RegionConfig(id="right", polygon=[[150, 0], [300, 0], [300, 300], [150, 300]])],
        debounce_s=0,
    )
    events = run(L, [(0, [person(1, 50, 100), person(2, 250, 100), person(3, 60, 200)], ())])
    assert sorted((e.region, e.track_id) for e in events) == [("left", 1), ("left", 3), ("right", 2)]
    assert L.occupancy() == {"left": 2, "right": 1}
    events = run(L, [(1, [person(1, 250, 100), person(2, 250, 100)], (3,))])
    assert sorted((e.type, e.region, e.track_id, e.reason) for e in events) == [
        ("entry", "right", 1, None), ("exit", "left", 1, "left_region"), ("exit", "left", 3, "track_lost")]
    assert L.occupancy() == {"left": 0, "right": 2}
    assert sorted((e.type, e.track_id) for e in L.finish()) == [("exit", 1), ("exit", 2)]


def test_center_anchor_differs_from_feet():
    # Feet inside, centre above the region.
    p = person(1, 150, 120, h=100)
    assert run(logic("bottom_center"), [(0, [p], ())])
    assert not run(logic("center"), [(0, [p], ())])


def test_bbox_overlap_anchor():
    half_in = TrackedPerson(1, np.array([150, 100, 250, 200], np.float32), 0.9)  # 50% inside
    assert run(logic("bbox_overlap", min_overlap=0.5), [(0, [half_in], ())])
    assert not run(logic("bbox_overlap", min_overlap=0.6), [(0, [half_in], ())])
    z = Zone(RegionConfig(id="r", polygon=SQUARE))
    fr = z.bbox_overlap(np.array([[100, 100, 200, 200], [0, 0, 50, 50], [150, 150, 250, 250]]), 300, 300)
    assert fr == pytest.approx([1.0, 0.0, 0.25], abs=0.03)


def test_mask_footprint_and_mask_overlap():
    m = np.zeros((300, 300), bool)
    m[120:190, 140:160] = True  # inside the square, box says feet at y=260 (outside)
    p = TrackedPerson(1, np.array([140, 120, 160, 260], np.float32), 0.9, m)
    assert mask_footprint(m) == (149.5, 189.0)
    events = run(logic("bottom_center"), [(0, [p], ())])
    assert events and events[0].anchor == (149.5, 189.0)
    assert events[0].mask_bbox == (140.0, 120.0, 160.0, 190.0)
    assert run(logic("mask_overlap", min_overlap=0.9), [(0, [p], ())])
    m2 = np.zeros((300, 300), bool)
    m2[150:250, 140:160] = True  # half inside
    p2 = TrackedPerson(2, np.array([140, 150, 160, 250], np.float32), 0.9, m2)
    assert not run(logic("mask_overlap", min_overlap=0.9), [(0, [p2], ())])
    assert mask_footprint(np.zeros((5, 5), bool)) is None


def test_mask_polygon_in_events_when_asked():
    m = np.zeros((300, 300), bool)
    m[120:190, 130:170] = True
    p = TrackedPerson(1, np.array([130, 120, 170, 190], np.float32), 0.9, m)
    L = RegionLogic("cam", [RegionConfig(id="r", polygon=SQUARE)], debounce_s=0, mask_polygon=True)
    (entry,) = run(L, [(0, [p], ())])
    assert entry.mask_polygon == [[130.0, 120.0], [130.0, 189.0], [169.0, 189.0], [169.0, 120.0]]
    (entry,) = run(logic(), [(0, [p], ())])
    assert entry.mask_polygon is None and entry.mask_bbox == (130.0, 120.0, 170.0, 190.0)


def tentative(tid: int, x: float, y: float) -> TrackedPerson:
    p = person(tid, x, y)
    return TrackedPerson(p.track_id, p.bbox, p.score, confirmed=False)


def test_entry_of_a_new_track_waits_for_confirmation_and_keeps_its_first_frame():
    lg = logic(debounce_s=0.2)
    steps = [(i, [tentative(1, 150, 150)], ()) for i in range(5)] + [(5, [person(1, 150, 150)], ())]
    out = run(lg, steps)
    assert [(t.type, t.frame) for t in out] == [("entry", 0)]


def test_a_track_never_confirmed_leaves_no_events():
    lg = logic(debounce_s=0.0)
    out = run(lg, [(i, [tentative(1, 150, 150)], ()) for i in range(5)] + [(5, [], (1,))])
    assert out == [] and lg.occupancy() == {"r": 0}


def test_a_short_visit_still_counts_when_it_lasts_the_debounce():
    """In for 0.5 s (debounce 0.4 s), out again: one entry and one exit, at the right frames."""
    lg = logic(debounce_s=0.4)
    xs = [50] * 3 + [150] * 5 + [250] * 6
    out = run(lg, [(i, [person(1, x, 150)], ()) for i, x in enumerate(xs)])
    assert [(t.type, t.frame) for t in out] == [("entry", 3), ("exit", 8)]
