"""The SAM2 backend wired into the daemon (random weights: mechanics only, never quality)."""

from __future__ import annotations

import json
import subprocess
import textwrap

import av
import numpy as np
import pytest
import torch

from daemon.config import Sam2Config
from daemon.records import Detections, Frame
from daemon.tracking.sam2 import Sam2LoadError, Sam2Tracker, load_sam2_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_sam2_model(Sam2Config(device="cpu", image_size=256, random_weights_for_tests=True))


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


def dets(*boxes):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.linspace(0.9, 0.8, len(b)).astype(np.float32))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = Sam2Config.model_construct(**{**Sam2Config(device="cpu").model_dump(), "checkpoint": str(tmp_path / "no.pt")})
    with pytest.raises(Sam2LoadError, match=r"tracker.sam2.checkpoint: SAM2 checkpoint not found: .*no.pt"):
        load_sam2_model(cfg)
    cfg = Sam2Config.model_construct(**{**Sam2Config(device="cpu").model_dump(), "checkpoint": ""})
    with pytest.raises(Sam2LoadError, match="not set"):
        load_sam2_model(cfg)


def test_new_people_from_unmatched_detections_only(model, frames):
    cfg = Sam2Config(device="cpu", image_size=256, random_weights_for_tests=True, track_fps=10, max_people=3)
    t = Sam2Tracker(model, cfg, lost_after_s=5.0, camera="hall")
    person, other = [384, 130, 518, 390], [40, 100, 120, 300]
    u = t.update(Frame("hall", 0, 0.0, 0.0, frames[0]), dets(person))
    assert t.active == 1 and t.session.people == (1,)
    for p in u.people:
        assert p.mask.shape == frames[0].shape[:2] and p.mask.dtype == bool
    # Not a detector frame and not due at track_fps: nothing to say.
    assert t.update(Frame("hall", 1, 0.05, 0.0, frames[1]), None) is None
    # The same person detected again matches (no new id); a second person is added.
    t.update(Frame("hall", 2, 0.1, 0.0, frames[2]), dets(person, other))
    assert t.session.people == (1, 2)
    # max_people caps the session.
    t.update(Frame("hall", 3, 0.2, 0.0, frames[3]), dets(person, other, [600, 50, 700, 400], [200, 50, 260, 300]))
    assert t.active == 3 and t.skipped_full == 1
    done = t.finish(Frame("hall", 4, 0.3, 0.0, frames[4]))
    assert done.ended == (1, 2, 3) and t.active == 0 and t.session.people == ()


def test_people_end_after_lost_after_s_without_presence(model, frames):
    cfg = Sam2Config(device="cpu", image_size=256, random_weights_for_tests=True, track_fps=10)
    t = Sam2Tracker(model, cfg, lost_after_s=0.3, camera="hall")
    t.update(Frame("hall", 0, 0.0, 0.0, frames[0]), dets([384, 130, 518, 390]))
    ended, present_until = [], 0.0
    for i in range(1, 12):
        u = t.update(Frame("hall", i, i / 10, 0.0, frames[i]), None)
        if u.people:
            present_until = i / 10
        ended += u.ended
        if ended:
            # A person ends exactly when SAM2 has not seen them for more than lost_after_s.
            assert i / 10 - present_until > 0.3 - 1e-9
            break
    # With random weights SAM2 may keep "seeing" them; then they must still be tracked.
    assert ended == [1] or t.active == 1


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
        image_size = 256
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
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM WEIGHTS" in r.stderr
    assert "frames processed" in r.stderr
    events_file = tmp_path / "events.jsonl"
    events = [json.loads(x) for x in events_file.read_text().splitlines()] if events_file.exists() else []
    # Random weights: whether SAM2's masks overlap the region is arbitrary, but what is emitted
    # must be consistent: entries and exits pair up per track, exits after entries.
    opened = {}
    for e in events:
        key = (e["track_id"], e["region"])
        if e["type"] == "entry":
            assert key not in opened
            opened[key] = e
            assert len(e["mask_bbox"]) == 4
        else:
            assert opened.pop(key)["frame"] <= e["frame"]
    assert not opened
