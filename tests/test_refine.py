"""daemon.refine: entry times looked up in the frame buffer, on the real footage with the real detector.

The App runs in-process on short clips cut losslessly (FFV1, bit-identical frames) from the
sample footage, so only the seconds around each entry are processed. Every segment starts on a
multiple of 10 frames, so with ``interval_s = 1.0`` the detector runs on the same frames as in a
run over the whole file (0, 10, 20, ...), and starts with an empty scene, so each visitor is a
new track there as in the full run.
"""

from __future__ import annotations

import json
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import av
import jsonschema
import numpy as np
import pytest

from daemon.app import App
from daemon.config import RegionConfig, Settings
from daemon.events import RegionTransition, json_schema
from daemon.framebuffer import FrameBuffer
from daemon.records import Frame
from daemon.refine import BUDGET_EXCEEDED, BUFFER_TOO_SHORT, DISABLED, YES, Deadline, DetectorLookback, EntryRefiner, match_box
from daemon.regions import Zone

POLYGON = [[360, 330], [560, 330], [560, 412], [360, 412]]  # the floor in front of the table
INTERVAL_FRAMES = 10  # interval_s = 1.0 at 10 fps
TINY_BUDGET_S = 0.001

# Observed by looking at the footage with POLYGON drawn on it (zoomed montages of the frames
# around each entry): the first frame on which the visitor's lowest foot — the bottom_center
# anchor, the bottom of the person's box — is inside the polygon. (The person detector agrees on
# the raw frames: its box bottom first crosses y = 412 on these same frames.)
OBSERVED_ENTRIES = {1: 74, 2: 242, 3: 520, 4: 762, 5: 940, 6: 1254}
TOLERANCE_FRAMES = 2

# Segments [start, stop) of the footage: each begins with at least two detector runs on an empty
# scene (the previous visitor's track ends) and ends after the detector run that confirms the
# entry (region logic debounces: the entry is emitted one detector run after the detection).
SEGMENTS = {1: (40, 100), 2: (210, 270), 3: (480, 540), 4: (730, 790), 5: (900, 960), 6: (1220, 1280)}
# Visitor 2 again, with every frame before 242 replaced by the empty scene (frame 210): the
# detector cannot find the person before they stand inside.
LOST_SEGMENT, LOST_FROM = (210, 280), 242


def cut(src: Path, dst: Path, segments: list[tuple[int, int]], *, blank_before: dict[int, int] | None = None) -> None:
    """Concatenate frame ranges of ``src`` into an FFV1 file (lossless: frames stay bit-identical).

    ``blank_before[k] = i``: in segment ``k`` the frames before footage frame ``i`` show the
    segment's first frame instead.
    """
    blank_before = blank_before or {}
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        enc = out.add_stream("ffv1", rate=10)
        enc.width, enc.height, enc.pix_fmt = stream.codec_context.width, stream.codec_context.height, "yuv420p"
        enc.time_base = Fraction(1, 10)
        n = 0
        for k, (start, stop) in enumerate(segments):
            inp.seek(int(start / 10 / stream.time_base), stream=stream, backward=True)
            first = None
            for vf in inp.decode(stream):
                i = round(float(vf.pts * stream.time_base) * 10)
                if i < start:
                    continue
                if i >= stop:
                    break
                if first is None:
                    first = vf.to_ndarray()  # yuv420p planes
                if i < blank_before.get(k, -1):
                    vf = av.VideoFrame.from_ndarray(first, format="yuv420p")  # the empty scene again
                vf.pts, vf.time_base = n, Fraction(1, 10)
                out.mux(enc.encode(vf))
                n += 1
        out.mux(enc.encode(None))


def offsets(segments: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(clip start, footage start, footage stop) per segment."""
    out, at = [], 0
    for start, stop in segments:
        out.append((at, start, stop))
        at += stop - start
    return out


def to_footage(segments: list[tuple[int, int]], clip_frame: int) -> tuple[int, int]:
    """(segment number, footage frame) of a clip frame."""
    for k, (at, start, stop) in enumerate(offsets(segments)):
        if at <= clip_frame < at + stop - start:
            return k, clip_frame - at + start
    raise ValueError(clip_frame)


def camera(cam_id: str, url: Path, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [[cameras]]
        id = "{cam_id}"
        url = "{url}"
        {extra}
        [[cameras.regions]]
        id = "table"
        polygon = {POLYGON}
        anchor = "bottom_center"
        """
    )


def run_app(tmp: Path, model: Path, cameras: str, *, budget_s: float) -> tuple[App, list[dict]]:
    out = tmp / f"run-{budget_s}"
    out.mkdir()
    toml = textwrap.dedent(
        f"""
        [detector]
        model = "{model}"
        interval_s = 1.0
        [refine]
        enabled = true
        budget_s = {budget_s}
        [sinks.stdout]
        enabled = false
        [sinks.jsonl]
        path = "{out}/events.jsonl"
        [state]
        dir = "{out}/state"
        [metrics]
        enabled = false
        """
    ) + cameras
    app = App(Settings.from_toml_text(toml))
    assert app.run() == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return app, events


MAIN = [SEGMENTS[v] for v in sorted(SEGMENTS)] + [LOST_SEGMENT]


@pytest.fixture(scope="module")
def clips(tmp_path_factory, footage) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("refine-clips")
    cut(footage, tmp / "main.mkv", MAIN, blank_before={len(MAIN) - 1: LOST_FROM})
    # Visitor 2 appearing already inside (the blanked segment): only a look back finds the entry.
    cut(footage, tmp / "short.mkv", [LOST_SEGMENT], blank_before={0: LOST_FROM})
    return {"main": tmp / "main.mkv", "short": tmp / "short.mkv"}


def entries_by_visitor(events: list[dict], camera_id: str = "main") -> dict[int, dict]:
    """Entry events of the main clip by visitor number (7 = visitor 2 in the blanked segment)."""
    out = {}
    for e in events:
        if e["camera"] == camera_id and e["type"] == "entry":
            k, frame = to_footage(MAIN, e["frame"])
            k2, detected = to_footage(MAIN, e["detected_frame"])
            assert k == k2, e
            assert k + 1 not in out, f"two entries in segment {k + 1}: {events}"
            out[k + 1] = {**e, "footage_frame": frame, "footage_detected": detected}
    return out


@pytest.fixture(scope="module")
def refined(tmp_path_factory, clips, yolo_model):
    """Refinement on, generous budget; plus visitor 2 on a camera whose buffer holds 0.3 s."""
    tmp = tmp_path_factory.mktemp("refined")
    cams = camera("main", clips["main"]) + camera("short", clips["short"], "buffer_s = 0.3")
    t0 = time.monotonic()
    app, events = run_app(tmp, yolo_model, cams, budget_s=30.0)
    print(f"\nrefined run: {time.monotonic() - t0:.1f} s")
    return app, events


@pytest.fixture(scope="module")
def tiny_budget(tmp_path_factory, clips, yolo_model):
    """Refinement on with a budget no detector run fits in: the entries stay where detected."""
    tmp = tmp_path_factory.mktemp("tiny")
    t0 = time.monotonic()
    app, events = run_app(tmp, yolo_model, camera("main", clips["main"]), budget_s=TINY_BUDGET_S)
    print(f"\ntiny-budget run: {time.monotonic() - t0:.1f} s")
    return app, events


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_refined_entries_are_the_observed_frames(refined, tiny_budget):
    app, events = refined
    entries = entries_by_visitor(events)
    unrefined = entries_by_visitor(tiny_budget[1])
    assert sorted(entries) == sorted(unrefined) == [1, 2, 3, 4, 5, 6, 7], [(e["type"], e["frame"]) for e in events]
    print("\nvisitor  observed  unrefined  refined  (error unrefined / refined, frames)")
    for v, want in OBSERVED_ENTRIES.items():
        e, u = entries[v], unrefined[v]
        print(
            f"{v:>7}  {want:>8}  {u['footage_frame']:>9}  {e['footage_frame']:>7}  "
            f"({u['footage_frame'] - want:+d} / {e['footage_frame'] - want:+d})  {e['refined']}"
        )
    stats = app.pipelines[0].refiner.stats
    print(f"detector runs for refinement: {stats.probes} for {stats.entries} entries ({dict(stats.by_status)})")
    for v, want in OBSERVED_ENTRIES.items():
        e = entries[v]
        assert e["refined"] == "yes", e
        assert abs(e["footage_frame"] - want) <= TOLERANCE_FRAMES, (v, e["footage_frame"], want)
        # The detection is where an unrefined run reports the entry; the refined one is earlier.
        assert e["footage_detected"] == unrefined[v]["footage_frame"]
        assert e["footage_frame"] <= e["footage_detected"]
        assert e["pts_s"] == pytest.approx(e["frame"] / 10, abs=1e-3)
        assert e["anchor"][1] <= 412 and 360 <= e["anchor"][0] <= 560, e  # the anchor is inside
    # Bisection: about log2(frames between detector runs) runs per entry, not one per frame.
    assert stats.probes <= 6 * 4 + 8, stats  # 6 visitors (<= 4 each) + the blanked segment


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_without_refinement_following_already_puts_entries_on_the_observed_frames(tiny_budget):
    """The tracker follows each visitor on every frame from where the detector first saw them
    (outside the region): the entry is found on time, however rarely the detector runs."""
    entries = entries_by_visitor(tiny_budget[1])
    late = {v: entries[v]["footage_frame"] - want for v, want in OBSERVED_ENTRIES.items()}
    assert all(abs(d) <= TOLERANCE_FRAMES for d in late.values()), late
    assert any(entries[v]["footage_frame"] % INTERVAL_FRAMES for v in OBSERVED_ENTRIES), late  # not on detector frames
    for e in entries.values():  # left where the pipeline found it
        assert e["frame"] == e["detected_frame"]


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_budget_is_respected(tiny_budget):
    app, events = tiny_budget
    entries = entries_by_visitor(events)
    # Walking in, the tracker saw each visitor outside on the frame before: "yes" with no look
    # back. Visitor 7 appears already inside: the look back it needs does not fit in 1 ms.
    assert {v: e["refined"] for v, e in entries.items()} == {**{v: YES for v in OBSERVED_ENTRIES}, 7: BUDGET_EXCEEDED}
    stats = app.pipelines[0].refiner.stats
    assert stats.probes == 0  # no detector run fits in 1 ms: none was started
    exceeded = app.metrics.registry.get_sample_value("regionwatch_refine_budget_exceeded_total", {"camera": "main"})
    assert exceeded == 1
    # Refinement held the pipeline (and every other event of the camera) no longer than the budget
    # (plus thread scheduling: the decoder and JPEG encoder threads share the GIL).
    assert stats.max_batch_s <= TINY_BUDGET_S + 0.05, stats


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_person_not_found_before_the_entry(refined):
    """Visitor 2 appears out of nothing at 242, already inside: first seen by the detector at 250."""
    e = entries_by_visitor(refined[1])[7]
    assert LOST_FROM <= e["footage_detected"] <= 250, e  # the entry of a new track is its first sighting
    assert e["refined"] == "person_lost", e
    assert abs(e["footage_frame"] - LOST_FROM) <= TOLERANCE_FRAMES, e


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_buffer_too_short(refined):
    _, events = refined
    (e,) = [e for e in events if e["camera"] == "short" and e["type"] == "entry"]
    assert e["refined"] == BUFFER_TOO_SHORT
    assert e["frame"] == e["detected_frame"]


@pytest.mark.slow  # shares two in-process App runs over 430 frames
def test_exit_dwell_counts_from_the_refined_entry(refined):
    _, events = refined
    validator = jsonschema.Draft202012Validator(json_schema())
    open_entries = {}
    exits = 0
    for e in events:
        validator.validate(e)
        key = (e["camera"], e["track_id"], e["region"])
        if e["type"] == "entry":
            open_entries[key] = e
        else:
            entry = open_entries.pop(key)
            assert e["dwell_s"] == pytest.approx(e["pts_s"] - entry["pts_s"], abs=2e-3)
            exits += 1
    assert exits >= 7 and not open_entries


# -- in-process, on real frames with the real detector ---------------------------------------


@pytest.fixture(scope="module")
def visitor2(footage) -> list[Frame]:
    """Footage frames 230..250 (visitor 2 walks in; first inside at 242)."""
    frames = []
    with av.open(str(footage)) as c:
        for i, vf in enumerate(c.decode(video=0)):
            if i >= 230:
                frames.append(Frame("hall", i, i / 10, 1e9 + i / 10, vf.to_ndarray(format="bgr24")))
            if i == 250:
                return frames


@pytest.fixture(scope="module")
def detector(yolo_model):
    from daemon.detector import PersonDetector

    det = PersonDetector(str(yolo_model))
    det(np.zeros((432, 768, 3), np.uint8))  # warm up
    return det


def refiner_on(frames: list[Frame], detector, budget_s: float) -> tuple[EntryRefiner, RegionTransition]:
    buf = FrameBuffer("hall", lossless=True, encode_all=False, buffer_s=10)
    for f in frames:
        buf.remember(f)
    zone = Zone(RegionConfig(id="table", polygon=POLYGON))
    refiner = EntryRefiner("hall", buf, [zone], DetectorLookback(detector), budget_s=budget_s)
    last = frames[-1]
    for f in (frames[0], frames[10], last):  # live detector runs at 230, 240, 250
        t0 = time.perf_counter()
        d = detector(f.image)
        refiner.detector_ran(f.index, time.perf_counter() - t0)
    box = tuple(float(v) for v in d.xyxy[0])
    entry = RegionTransition(
        "entry", "hall", "table", 1, last.index, last.pts_s, last.wall_time, box,
        ((box[0] + box[2]) / 2, box[3]), float(d.confidence[0]),
    )
    return refiner, entry


def test_tight_budget_stops_between_detector_runs(visitor2, detector):
    refiner, entry = refiner_on(visitor2, detector, budget_s=30.0)
    step = refiner.lookback.expected_step_s
    refiner.budget_s = 1.5 * step  # room for one detector run, not two
    t0 = time.perf_counter()
    (got,) = refiner.process([entry])
    elapsed = time.perf_counter() - t0
    assert got.refined == BUDGET_EXCEEDED, got
    assert refiner.stats.probes == 1
    assert 242 < got.frame < 250 and got.detected_frame == 250  # halfway: better, not done
    # It stopped instead of starting a run that would not fit (one run of scheduling slack).
    assert elapsed <= refiner.budget_s + step, (elapsed, refiner.budget_s, step)


def test_full_budget_finds_the_entry_in_log2_runs(visitor2, detector):
    refiner, entry = refiner_on(visitor2, detector, budget_s=30.0)
    (got,) = refiner.process([entry])
    assert (got.frame, got.detected_frame, got.refined) == (242, 250, "yes")
    assert got.pts_s == pytest.approx(24.2) and got.wall_time == pytest.approx(1e9 + 24.2)
    assert refiner.stats.probes <= 4  # 9 frames between detector runs: ceil(log2(10))


def test_disabled_reports_the_detection(visitor2):
    buf = FrameBuffer("hall", lossless=True, encode_all=False)
    zone = Zone(RegionConfig(id="table", polygon=POLYGON))
    refiner = EntryRefiner("hall", buf, [zone], DetectorLookback(lambda image: None), enabled=False)
    entry = RegionTransition("entry", "hall", "table", 1, 250, 25.0, 1e9 + 25, (0, 0, 1, 1), (0.5, 1), 0.9)
    exit_ = RegionTransition("exit", "hall", "table", 1, 300, 30.0, 1e9 + 30, (0, 0, 1, 1), (0.5, 1), 0.9, dwell_s=5.0)
    got = refiner.process([entry, exit_])
    assert (got[0].frame, got[0].detected_frame, got[0].refined) == (250, 250, DISABLED)
    assert got[1] == exit_


def test_match_box_follows_the_walker_not_a_bystander():
    walker, bystander = [400, 40, 480, 420], [600, 60, 680, 420]
    # 0.5 s earlier the walker was 60 px to the left, in a thinner box: no overlap left, still matched.
    boxes = np.array([bystander, [340, 50, 400, 410]], float)
    assert match_box(walker, boxes, 0.5) == 1
    assert match_box(walker, boxes[:1], 0.1) is None  # 200 px is too far for a tenth of a second
    assert match_box(walker, np.array([[402, 42, 478, 421]]), 0.1) == 0  # plain IoU
    assert Deadline(0.0).allows(0.001) is False
