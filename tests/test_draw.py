"""The drawing module: what ends up on the pixels (regions, people, masks, banners, snapshots)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from daemon.config import RegionConfig
from daemon.draw import (
    ENTRY_COLOR,
    EXIT_COLOR,
    REGION_COLOR,
    BannerAnnotator,
    ColorPalette,
    MaskMemory,
    PersonAnnotator,
    RegionAnnotator,
    SceneAnnotator,
    SceneBuilder,
    banner_for,
    blend,
    draw_label,
    encode_jpeg,
    render_snapshot,
)
from daemon.events import RegionTransition
from daemon.records import Frame, TrackedPerson, TrackUpdate

SQUARE = RegionConfig(id="table", polygon=[[40, 60], [120, 60], [120, 110], [40, 110]])
TRIANGLE = RegionConfig(id="corner", polygon=[[150, 20], [230, 20], [150, 100]])
# The sample footage's region (the floor in front of the table), as in demo/sample-footage.toml.
FLOOR = RegionConfig(id="table", polygon=[[360, 330], [560, 330], [560, 412], [360, 412]])


def grey(h: int = 140, w: int = 260, v: int = 120) -> np.ndarray:
    return np.full((h, w, 3), v, np.uint8)


def transition(kind: str, track: int, region: str = "table", frame: int = 0, pts: float = 0.0,
               **kw) -> RegionTransition:
    return RegionTransition(kind, "hall", region, track, frame, pts, 0.0, (60.0, 20.0, 100.0, 100.0), (80.0, 100.0),
                            0.9, **kw)


def near(img: np.ndarray, color, tol: int = 30) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(color)).max(axis=-1) <= tol


# -- colours ----------------------------------------------------------------------------------
def test_palette_is_stable_and_distinct_for_consecutive_ids():
    a, b = ColorPalette.default(), ColorPalette.default()
    assert [a.by_id(i) for i in range(1, 50)] == [b.by_id(i) for i in range(1, 50)]
    assert len({a.by_id(i) for i in range(1, 9)}) == 8  # eight people in view: eight colours
    assert a.by_id(1) == a.by_id(1 + len(a))  # then it cycles
    # No track colour can be mistaken for the red regions.
    for c in a.colors:
        assert np.abs(np.array(c) - np.array(REGION_COLOR)).max() > 60


def test_palette_from_tab10_hex_is_bgr():
    assert ColorPalette.default().by_id(1) == (0xB4, 0x77, 0x1F)  # tab10 blue #1f77b4 as BGR


# -- blending ---------------------------------------------------------------------------------
def test_blend_tints_only_the_mask_with_exact_weights():
    img = grey(10, 10, 100)
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    blend(img, m, (0, 0, 200), 0.25, origin=(2, 3))
    tinted = np.zeros((10, 10), bool)
    tinted[4:6, 3:5] = True
    assert (img[tinted] == [75, 75, 125]).all()
    assert (img[~tinted] == 100).all()


@pytest.mark.parametrize("origin", [(-3, -2), (8, 7), (-50, 0), (100, 100)])
def test_blend_clips_masks_that_stick_out_of_the_image(origin):
    img = grey(10, 10, 100)
    m = np.ones((5, 5), bool)
    blend(img, m, (255, 255, 255), 0.5, origin=origin)
    ox, oy = origin
    expect = np.zeros((10, 10), bool)
    expect[max(oy, 0) : max(min(oy + 5, 10), 0), max(ox, 0) : max(min(ox + 5, 10), 0)] = True
    assert ((img[..., 0] != 100) == expect).all()


def test_blend_with_zero_opacity_changes_nothing():
    img = grey()
    blend(img, np.ones((20, 20), bool), (0, 0, 255), 0.0)
    assert (img == 120).all()


def test_labels_stay_inside_the_image():
    img = grey(40, 60)
    for anchor in [(-30, -30), (55, 5), (200, 200), (0, 0)]:
        x1, y1, x2, y2 = draw_label(img, "#12 in table", anchor, (255, 0, 0), scale=0.4)
        assert 0 <= x1 and 0 <= y1 and y2 <= 40


# -- regions ----------------------------------------------------------------------------------
def test_region_fill_tints_inside_polygon_only():
    img = grey()
    RegionAnnotator([SQUARE, TRIANGLE], show_count=False, thickness=1).annotate(img)
    inside_sq, inside_tri = img[85, 80], img[40, 165]
    for px in (inside_sq, inside_tri):
        assert px[2] > 120 and px[0] < 120 and px[1] < 120  # redder
    assert (img[130, 250] == 120).all() and (img[5, 5] == 120).all()
    # Just beyond the triangle's hypotenuse (x + y = 250) stays untouched.
    assert (img[90, 200] == 120).all()


def test_occupied_regions_are_filled_more_strongly():
    empty, busy = grey(), grey()
    RegionAnnotator([SQUARE], show_count=False).annotate(empty, {"table": 0})
    RegionAnnotator([SQUARE], show_count=False).annotate(busy, {"table": 2})
    assert busy[85, 80, 2] > empty[85, 80, 2] > 120


def test_region_outline_and_count_label():
    img = grey()
    RegionAnnotator([SQUARE]).annotate(img, {"table": 3})
    assert near(img[110, 80], REGION_COLOR, 40).all()  # bottom edge
    label = img[30:60, 40:110]  # the label sits on top of the polygon's top edge
    assert near(label, REGION_COLOR, 10).sum() > 200
    assert (label > 200).all(axis=-1).sum() > 20  # white text on it


# -- people -----------------------------------------------------------------------------------
def test_person_box_in_track_colour_and_mask_tinted():
    img = grey()
    mask = np.zeros(img.shape[:2], bool)
    mask[40:90, 70:90] = True
    p = TrackedPerson(3, np.array([60.0, 30.0, 100.0, 100.0]), 0.9, mask)
    PersonAnnotator(thickness=2).annotate(img, [p])
    color = ColorPalette.default().by_id(3)
    assert near(img[65, 60], color, 5).all()  # left edge of the box
    inside_mask = img[60:80, 74:86].reshape(-1, 3).astype(int)
    expect = 0.55 * 120 + 0.45 * np.array(color)
    assert np.abs(inside_mask - expect).max() <= 2
    assert (img[95, 65] == 120).all()  # inside the box, outside the mask
    assert near(img[10:30, 58:100], color, 5).sum() > 100  # the "#3" label above the box


def test_people_without_masks_get_boxes_only():
    img = grey()
    PersonAnnotator().annotate(img, [TrackedPerson(1, np.array([60.0, 30.0, 100.0, 100.0]), 0.9)])
    assert (img[60:90, 70:90] == 120).all()


def test_same_track_same_colour_across_frames_and_annotators():
    box = np.array([60.0, 30.0, 100.0, 100.0])
    a, b = grey(), grey()
    PersonAnnotator().annotate(a, [TrackedPerson(7, box, 0.9)])
    PersonAnnotator().annotate(b, [TrackedPerson(7, box + 5, 0.5)])
    c = grey()
    PersonAnnotator().annotate(c, [TrackedPerson(8, box, 0.9)])
    assert (a[65, 60] == b[70, 65]).all()
    assert not (a[65, 60] == c[65, 60]).all()


# -- banners and scenes -----------------------------------------------------------------------
def test_banner_texts():
    assert banner_for(transition("entry", 4), 1.0).text == "#4 entered table"
    left = banner_for(transition("exit", 4, dwell_s=3.25, reason="left_region"), 1.0)
    assert left.text == "#4 left table after 3.2 s"
    lost = banner_for(transition("exit", 4, dwell_s=1.0, reason="track_lost"), 1.0)
    assert lost.text.endswith("(lost)") and lost.color == EXIT_COLOR


def test_banners_stack_in_the_top_right_corner():
    img = grey(200, 400, 0)
    b1, b2 = banner_for(transition("entry", 1), 9), banner_for(transition("exit", 2, dwell_s=1), 9)
    BannerAnnotator().annotate(img, [b1, b2])
    assert near(img[:, 200:], ENTRY_COLOR, 5).sum() > 200 and near(img[:, 200:], EXIT_COLOR, 5).sum() > 200
    assert not img[:, :150].any() and not img[120:].any()
    rows_entry = np.flatnonzero(near(img, ENTRY_COLOR, 5).any(axis=1))
    rows_exit = np.flatnonzero(near(img, EXIT_COLOR, 5).any(axis=1))
    assert rows_exit.max() < rows_entry.min()  # newest first


def test_scene_builder_counts_follow_transitions_and_banners_expire():
    b = SceneBuilder([SQUARE, TRIANGLE], banner_s=1.0)
    img = grey()

    def frame(i):
        return Frame("hall", i, i / 10, 0.0, img)

    p1 = TrackedPerson(1, np.array([60.0, 30.0, 100.0, 100.0]), 0.9)
    p2 = TrackedPerson(2, np.array([150.0, 20.0, 180.0, 90.0]), 0.9)
    s = b.observe(frame(0), TrackUpdate(frame(0), (p1, p2)), [transition("entry", 1), transition("entry", 2, "corner"),
                                                              transition("entry", 2)])
    assert s.counts == {"table": 2, "corner": 1}
    assert s.inside == {1: ("table",), 2: ("corner", "table")}
    assert len(s.banners) == 3
    s = b.observe(frame(5), None, [transition("exit", 1, dwell_s=0.5)])
    assert s.counts == {"table": 1, "corner": 1} and 1 not in s.inside
    assert s.people == (p1, p2)  # between tracker updates the last positions stay
    s = b.observe(frame(12), TrackUpdate(frame(12), (p2,), (1,)), [])
    assert [x.text for x in s.banners] == ["#1 left table after 0.5 s"]  # entries (t=0) expired at t=1.0
    assert s.people == (p2,)
    s = b.observe(frame(20), None, [])
    assert s.banners == ()


def test_scene_annotator_draws_everything_and_leaves_the_input_alone():
    img = grey()
    frame = Frame("hall", 3, 0.3, 0.0, img)
    b = SceneBuilder([SQUARE])
    p = TrackedPerson(1, np.array([60.0, 30.0, 100.0, 100.0]), 0.9)
    scene = b.observe(frame, TrackUpdate(frame, (p,)), [transition("entry", 1)])
    out = SceneAnnotator([SQUARE]).annotate(img, scene)
    assert (img == 120).all()
    assert near(out, ColorPalette.default().by_id(1), 5).sum() > 100
    assert near(out, ENTRY_COLOR, 5).sum() > 100
    assert out[85, 50, 2] > 120  # region tint left of the person


def test_annotating_a_real_frame(footage):
    with av.open(str(footage)) as c:
        image = next(c.decode(video=0)).to_ndarray(format="bgr24")
    frame = Frame("hall", 0, 0.0, 0.0, image)
    scene = SceneBuilder([FLOOR]).observe(frame, None, [])
    out = SceneAnnotator([FLOOR]).annotate(image, scene)
    poly = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(poly, [np.array(FLOOR.polygon, np.int32)], 1)
    inner = cv2.erode(poly, np.ones((9, 9), np.uint8)).astype(bool)
    diff = out.astype(int) - image.astype(int)
    # Tinted red (the floor is about BGR 28, 70, 129 there): red rises, green drops.
    assert diff[inner][:, 2].mean() > 15 and diff[inner][:, 1].mean() < -4
    far = np.zeros_like(inner)
    far[40:220, 150:330] = True  # the wall, away from every drawing
    assert (diff[far] == 0).all()


# -- snapshots --------------------------------------------------------------------------------
def test_snapshot_draws_the_person_and_their_region_only():
    img = grey()
    mask = np.zeros(img.shape[:2], bool)
    mask[40:90, 70:90] = True
    t = transition("entry", 5)
    out = render_snapshot(img, t, [SQUARE, TRIANGLE], mask=mask)
    assert (img == 120).all()
    color = ColorPalette.default().by_id(5)
    assert near(out[65, 60], color, 5).all()
    assert np.abs(out[50, 80].astype(int) - (0.55 * 120 + 0.45 * np.array(color))).max() <= 2
    assert out[105, 50, 2] > 120  # the entered region is tinted…
    assert (out[40, 165] == 120).all()  # …the other region is not drawn


def test_mask_memory_keeps_recent_masks_cropped():
    mem = MaskMemory(keep_s=0.5)
    img = grey()
    masks = {}
    for i in range(10):
        m = np.zeros(img.shape[:2], bool)
        m[10 + i : 40 + i, 20:30] = True
        masks[i] = m
        f = Frame("hall", i, i / 10, 0.0, img)
        mem.add(TrackUpdate(f, (TrackedPerson(1, np.array([20.0, 10, 30, 40]), 0.9, m),
                                TrackedPerson(2, np.array([0.0, 0, 1, 1]), 0.9))))
    assert (mem.get(9, 1) == masks[9]).all() and (mem.get(4, 1) == masks[4]).all()
    assert mem.get(3, 1) is None  # older than keep_s
    assert mem.get(9, 2) is None  # no mask for that person
    assert sum(c[2].size for _, _, crops in mem._items for c in crops.values()) == 6 * 30 * 10  # crops, not frames


def test_encode_jpeg_roundtrip():
    img = grey()
    img[20:40, 20:40] = (0, 0, 255)
    dec = cv2.imdecode(np.frombuffer(encode_jpeg(img, 90), np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape == img.shape and np.abs(dec.astype(int) - img).mean() < 3


# -- the daemon's entry snapshot --------------------------------------------------------------
def test_daemon_entry_snapshot_shows_that_person(tmp_path, footage, yolo_model):
    """``regionwatch run`` with JSONL snapshots on the footage's first 90 frames (entry near frame 75)."""
    clip = tmp_path / "clip.mp4"
    with av.open(str(footage)) as i, av.open(str(clip), "w") as o:
        s = i.streams.video[0]
        out = o.add_stream("libx264", rate=s.average_rate)
        out.width, out.height, out.pix_fmt = 768, 432, "yuv420p"
        out.options = {"crf": "12", "preset": "ultrafast"}
        raw = []
        for k, f in enumerate(i.decode(s)):
            if k == 90:
                break
            raw.append(f.to_ndarray(format="bgr24"))
            f.pts, f.time_base = k, 1 / s.average_rate
            o.mux(out.encode(f))
        o.mux(out.encode(None))
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[detector]
model = "{yolo_model}"
[sinks.stdout]
enabled = false
[sinks.jsonl]
path = "{tmp_path / 'events.jsonl'}"
snapshots = true
[state]
dir = "{tmp_path / 'state'}"
[metrics]
enabled = false
[[cameras]]
id = "hall"
url = "{clip}"
jpeg_quality = 90
[[cameras.regions]]
id = "table"
polygon = {FLOOR.polygon}
""")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(cfg)], cwd=repo,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    entry = next(e for e in events if e["type"] == "entry")
    assert 65 <= entry["frame"] <= 85
    snap = cv2.imread(entry["snapshot"], cv2.IMREAD_COLOR)
    assert snap is not None and snap.shape == (432, 768, 3)
    color = ColorPalette.default().by_id(entry["track_id"])
    x1, y1, x2, y2 = (int(round(v)) for v in entry["bbox"])
    left_edge = snap[max(y1, 30) : y2, max(x1 - 2, 0) : x1 + 3]
    assert near(left_edge, color, 45).any(axis=1).mean() > 0.9  # the box, drawn in the track's colour
    assert near(snap[:, :300], color, 45).sum() < 50  # nowhere else (nobody else is there)
    base = raw[entry["frame"]]
    inside = np.zeros(base.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.array(FLOOR.polygon, np.int32)], 1)
    inside = cv2.erode(inside, np.ones((9, 9), np.uint8)).astype(bool) & ~near(snap, color, 45)
    inside[:, x1 - 4 : x2 + 4] = False  # leave the person (legs) out
    diff = snap.astype(int) - base.astype(int)
    assert diff[inside][:, 2].mean() > 12 and diff[inside][:, 1].mean() < -3  # the entered region, tinted


def test_masks_from_the_real_sam2_tracker_are_drawn_exactly_where_they_are(footage):
    """A real :class:`Sam2Tracker` step (random weights: the mask's shape is meaningless, its pixels are real)."""
    torch = pytest.importorskip("torch", reason="SAM2 backend not installed (pip install .[sam2])")
    pytest.importorskip("sam2", reason="SAM2 backend not installed (pip install .[sam2])")
    from dataclasses import replace

    from daemon.config import Sam2Config
    from daemon.records import Detections
    from daemon.tracking.sam2 import Sam2Tracker, load_sam2_model

    with av.open(str(footage)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == 75:
                img = f.to_ndarray(format="bgr24")
                break
    torch.manual_seed(0)
    cfg = Sam2Config(device="cpu", image_size=256, random_weights_for_tests=True, bf16=False, confirm_steps=0)
    tracker = Sam2Tracker(load_sam2_model(cfg), cfg, lost_after_s=2.0, camera="hall")
    frame = Frame("hall", 75, 7.5, 0.0, img)
    update = tracker.update(frame, Detections(np.array([[372, 33, 540, 389]], np.float32), np.array([0.9], np.float32)))
    (person,) = update.people
    mask = person.mask
    assert mask.shape == img.shape[:2] and mask.any()

    out = SceneAnnotator([FLOOR]).annotate(img, SceneBuilder([FLOOR]).observe(frame, update, []))
    bare_update = TrackUpdate(frame, (replace(person, mask=None),))
    bare = SceneAnnotator([FLOOR]).annotate(img, SceneBuilder([FLOOR]).observe(frame, bare_update, []))
    other = (bare != img).any(axis=-1)  # region, box, labels, clock line
    m8 = mask.astype(np.uint8)
    kernel = np.ones((5, 5), np.uint8)
    outline = cv2.dilate(m8, kernel) != cv2.erode(m8, kernel)  # the mask's anti-aliased contour line
    core = mask & ~other & ~outline
    outside = ~mask & ~other & ~outline
    assert core.sum() > 1000 and outside.sum() > 1000
    color = np.array(ColorPalette.default().by_id(person.track_id))
    expect = 0.55 * img.astype(float) + 0.45 * color
    assert np.abs(out[core].astype(float) - expect[core]).max() <= 1.0
    assert (out[outside] == img[outside]).all()
