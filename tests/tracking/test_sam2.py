"""The SAM2 tracker policy over the real server (random weights: mechanics only, never quality).

With ``torch.manual_seed(0)`` at image size 128, SAM2 sees every prompted person (object score
> 0) with a mask covering much of the frame; with seed 6 it never sees anyone. Tests build their
detections from that: boxes that agree or disagree with SAM2's mask box.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap

import av
import numpy as np
import pytest

from daemon.config import CameraConfig, Sam2Config, Settings
from daemon.ops.metrics import Metrics
from daemon.records import Detections, Frame
from daemon.regions import Zone, mask_footprint
from daemon.tracking.sam2 import Sam2LoadError, Sam2Model, Sam2Tracker, build_sam2_tracker, load_sam2_model
from daemon.tracking.sam2_server import Sam2Server

BASE = dict(device="cpu", image_size=128, random_weights_for_tests=True, track_fps=10)
PERSON, OTHER = [384, 130, 518, 390], [40, 100, 120, 300]


@pytest.fixture(scope="module")
def seeing(sam2_model):
    """SAM2 that sees whoever is prompted."""
    return sam2_model


@pytest.fixture(scope="module")
def blind(sam2_builder):
    """SAM2 that never sees anyone (object score < 0)."""
    return sam2_builder(6)


@pytest.fixture(scope="module")
def frames(footage):
    """Frames 150..169 of the footage (a visitor standing at the table), BGR."""
    out = []
    with av.open(str(footage)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= 150:
                out.append(f.to_ndarray(format="bgr24"))
            if len(out) == 20:
                break
    return out


def tracker(predictor, metrics=None, camera="hall", server=None, **cfg) -> Sam2Tracker:
    config = Sam2Config(**{**BASE, **cfg})
    server = server or Sam2Server(predictor, max_people=config.max_people_total, thread=False, metrics=metrics)
    return Sam2Tracker(Sam2Model(predictor, config, server, None), config, lost_after_s=1.0, camera=camera, metrics=metrics)


def dets(*boxes):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.linspace(0.9, 0.8, len(b)).astype(np.float32))


def frame(frames, i, pts=None):
    return Frame("hall", i, i / 10 if pts is None else pts, 0.0, frames[i % len(frames)])


def count(counter, *labels) -> float:
    return counter.labels(*labels)._value.get()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = Sam2Config.model_construct(**{**Sam2Config(device="cpu").model_dump(), "checkpoint": str(tmp_path / "no.pt")})
    with pytest.raises(Sam2LoadError, match=r"tracker.sam2.checkpoint: SAM2 checkpoint not found: .*no.pt"):
        load_sam2_model(cfg)
    cfg = Sam2Config.model_construct(**{**Sam2Config(device="cpu").model_dump(), "checkpoint": ""})
    with pytest.raises(Sam2LoadError, match="not set"):
        load_sam2_model(cfg)


def test_new_people_are_tentative_until_sam2_sees_them(seeing, frames):
    t = tracker(seeing, confirm_steps=2, max_people=1)
    u = t.update(frame(frames, 0), dets(PERSON))
    assert u.people == () and t.tentative == (1,) and t.active == 0  # not reported yet
    assert t.update(frame(frames, 1, 0.05), None) is None  # not due at track_fps
    assert t.update(frame(frames, 2), None).people == () and t.tentative == (1,)
    u = t.update(frame(frames, 3), None)
    assert [p.track_id for p in u.people] == [1] and t.active == 1  # seen on 2 steps: confirmed
    person = u.people[0]
    assert person.mask.shape == frames[0].shape[:2] and person.mask.any()
    # The event score is SAM2's object score (a probability), not the detector's 0.9.
    assert 0.5 < person.score < 0.9
    ys, xs = np.nonzero(person.mask)
    assert person.bbox.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # The same person detected again is matched, not added; max_people caps the camera.
    t.update(frame(frames, 4), dets(PERSON, OTHER))
    assert sorted(t._tracks) == [1] and t.skipped_full == 1
    done = t.finish(frame(frames, 5))
    assert done.ended == (1,) and t.active == 0 and t.client.people == ()


def test_tentative_people_sam2_does_not_see_are_dropped_without_an_event(blind, frames):
    metrics = Metrics()
    t = tracker(blind, metrics, confirm_steps=1)
    assert t.update(frame(frames, 0), dets(PERSON)).people == ()
    u = t.update(frame(frames, 1), None)
    assert u.people == () and u.ended == () and t._tracks == {}
    assert count(metrics.sam2_tentative_dropped, "hall", "lost") == 1
    t.update(frame(frames, 2), None)
    assert t.client.people == ()  # the server forgot them with the next request


def test_reanchoring_from_the_detector(seeing, blind, frames):
    metrics = Metrics()
    # Box and mask disagree (SAM2's random mask is much larger than the person's box).
    t = tracker(seeing, metrics, camera="a", confirm_steps=0, reanchor_iou=0.5, max_cond_age_s=100)
    t.update(frame(frames, 0), dets(PERSON))
    t.update(frame(frames, 1), dets(PERSON))
    assert count(metrics.sam2_reanchors, "a", "disagree") == 1
    assert t.model.server.stats.prompted_rows == 2
    # Agreement required only loosely: no re-anchor, until the conditioning frame is too old.
    t = tracker(seeing, metrics, camera="b", confirm_steps=0, reanchor_iou=0.0, max_cond_age_s=0.25)
    for i in range(5):
        t.update(frame(frames, i), dets(PERSON))
    assert count(metrics.sam2_reanchors, "b", "age") == 1  # at 0.3 s; the next prompt is 0.1 s old
    assert count(metrics.sam2_reanchors, "b", "disagree") == 0
    cond = t.model.server._cameras[0].people[1].frames.cond
    assert cond == [0, 3]  # the two most recent prompts are its conditioning frames
    # SAM2 lost them but the detector still sees them: re-anchor.
    t = tracker(blind, metrics, camera="c", confirm_steps=0, reanchor_iou=0.0, max_cond_age_s=100)
    t.update(frame(frames, 0), dets(PERSON))
    t.update(frame(frames, 1), dets(PERSON))
    assert count(metrics.sam2_reanchors, "c", "lost") == 1 and sorted(t._tracks) == [1]


def test_duplicates_are_suppressed(seeing, frames):
    metrics = Metrics()
    # Two detections that are different people to the matcher, but SAM2's masks coincide.
    t = tracker(seeing, metrics, confirm_steps=1, duplicate_iou=0.8, reanchor_iou=0.0)
    t.update(frame(frames, 0), dets(PERSON))
    u = t.update(frame(frames, 1), dets(PERSON, OTHER))  # 1 found again (confirmed), 2 new and tentative
    assert sorted(t._tracks) == [1] and u.ended == () and [p.track_id for p in u.people] == [1]
    assert count(metrics.sam2_tentative_dropped, "hall", "duplicate") == 1
    t.update(frame(frames, 2), None)
    assert t.client.people == (1,)


def test_stream_discontinuity_ends_everyone_and_resets_sam2(seeing, frames):
    metrics = Metrics()
    t = tracker(seeing, metrics, confirm_steps=0, reset_gap_s=1.0, reanchor_iou=0.0)
    t.update(frame(frames, 0), dets(PERSON))
    assert t.update(frame(frames, 1), None).people[0].track_id == 1
    # Frames skipped by a lagging pipeline (index gap, small time gap) are no discontinuity.
    assert [p.track_id for p in t.update(frame(frames, 6, 0.6), None).people] == [1]
    u = t.update(frame(frames, 7, 2.5), None)  # 1.9 s later: e.g. a reconnect
    assert u.ended == (1,) and u.people == () and t._tracks == {}
    assert count(metrics.sam2_resets, "hall", "gap") == 1 and t.client.people == ()
    t.update(frame(frames, 8, 2.6), dets(PERSON))
    assert sorted(t._tracks) == [2]
    u = t.update(Frame("hall", 0, 2.7, 0.0, frames[0]), None)  # the index went back: a new source
    assert u.ended == (2,) and count(metrics.sam2_resets, "hall", "restart") == 1


def test_person_budget_is_shared_between_cameras(seeing, frames):
    metrics = Metrics()
    server = Sam2Server(seeing, max_people=1, thread=False, metrics=metrics)
    hall = tracker(seeing, metrics, camera="hall", server=server, confirm_steps=0)
    yard = tracker(seeing, metrics, camera="yard", server=server, confirm_steps=0)
    hall.update(frame(frames, 0), dets(PERSON))
    u = yard.update(frame(frames, 0), dets(PERSON))
    assert u.people == () and yard._tracks == {} and yard.skipped_full == 1
    assert count(metrics.sam2_people_rejected, "yard") == 1 and server.people == 1
    hall.finish(frame(frames, 1))
    assert [p.track_id for p in yard.update(frame(frames, 2), dets(PERSON)).people] == [2]


def test_factory_shares_one_server_with_region_overlaps(footage, yolo_model, frames):
    settings = Settings(
        detector={"model": str(yolo_model)},
        tracker={"backend": "sam2", "sam2": {**BASE, "confirm_steps": 0, "max_people_total": 3}},
        cameras=[{"id": "hall", "url": str(footage), "regions": [
            {"id": "table", "polygon": [[0, 0], [384, 0], [384, 432], [0, 432]]}]}, {"id": "yard", "url": str(footage)}],
    )
    shared, metrics = {}, Metrics()
    trackers = [build_sam2_tracker(settings, cam, shared, metrics=metrics) for cam in settings.cameras]
    server = shared["sam2"].server
    try:
        assert all(t.model.server is server for t in trackers) and server.max_people == 3 and server.threaded
        u = trackers[0].update(frame(frames, 0), dets(PERSON))
        person = u.people[0]
        region = Zone(settings.cameras[0].regions[0]).mask(768, 432)
        left = (person.mask & region).sum() / person.mask.sum()
        assert person.overlaps == pytest.approx((left,), abs=1e-6)  # computed on the device
        assert person.footprint == pytest.approx(mask_footprint(person.mask), abs=1e-3)
        assert [p.track_id for p in u.people] == [1]
        assert trackers[1].update(frame(frames, 0), dets(PERSON)).people[0].overlaps is None  # no regions
        assert metrics.sam2_people_budget._value.get() == 3
    finally:
        server.close()
    assert isinstance(settings.cameras[0], CameraConfig) and math.isfinite(metrics.sam2_tick_seconds._sum.get())


def test_daemon_runs_end_to_end_with_sam2(tmp_path, footage, yolo_model, regionwatch_bin):
    # A 12 s clip of the footage (a visitor walks in and stands at the table), re-muxed as-is.
    clip = tmp_path / "clip.mp4"
    with av.open(str(footage)) as src, av.open(str(clip), "w") as dst:
        s_in = src.streams.video[0]
        s_out = dst.add_stream_from_template(s_in)
        for packet in src.demux(s_in):
            if packet.pts is None or packet.dts is None:
                continue
            if packet.pts * s_in.time_base > 12:
                break
            packet.stream = s_out
            dst.mux(packet)
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(f"""
        [detector]
        model = "{yolo_model}"
        interval_s = 1.0
        [tracker]
        backend = "sam2"
        [tracker.sam2]
        device = "cpu"
        image_size = 128
        track_fps = 2
        random_weights_for_tests = true
        [sinks.jsonl]
        path = "{tmp_path}/events.jsonl"
        [state]
        dir = "{tmp_path}/state"
        [metrics]
        enabled = false
        [[cameras]]
        id = "hall"
        url = "{clip}"
        [[cameras.regions]]
        id = "table"
        polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
        anchor = "mask_overlap"
        min_overlap = 0.01
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM WEIGHTS" in r.stderr
    assert "frames processed" in r.stderr
    events_file = tmp_path / "events.jsonl"
    events = [json.loads(x) for x in events_file.read_text().splitlines()] if events_file.exists() else []
    # Random weights: whether SAM2's masks overlap the region is arbitrary, but what is emitted
    # must be consistent: entries and exits pair up per track, exits after entries, and the
    # score is SAM2's object score (a probability).
    opened = {}
    for e in events:
        key = (e["track_id"], e["region"])
        assert 0 < e["score"] < 1
        if e["type"] == "entry":
            assert key not in opened
            opened[key] = e
            assert len(e["mask_bbox"]) == 4
        else:
            assert opened.pop(key)["frame"] <= e["frame"]
    assert not opened


def test_a_failed_tick_ends_the_cameras_people_and_tracking_resumes(seeing, frames, monkeypatch):
    metrics = Metrics()
    t = tracker(seeing, metrics, confirm_steps=0, reanchor_iou=0.0)
    t.update(frame(frames, 0), dets(PERSON))
    with monkeypatch.context() as patch:
        patch.setattr(seeing, "forward_image", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
        with pytest.raises(RuntimeError, match="SAM2 tick failed"):
            t.update(frame(frames, 1), None)  # the pipeline logs it and goes on with the next frame
    u = t.update(frame(frames, 2), dets(OTHER))
    assert u.ended == (1,) and sorted(t._tracks) == [2] and count(metrics.sam2_resets, "hall", "failure") == 1
    assert t.client.people == (2,) and t.model.server.people == 1  # nobody orphaned in the server
