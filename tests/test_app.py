"""End to end: the daemon on the real sample footage gives the entries and exits seen in the video."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest

from daemon.events import json_schema

# Observed by looking at the footage (one-by-one-person-detection.mp4, 10 fps) with the region
# below drawn on it: the frame where a visitor's feet first stand inside the floor area in front
# of the table, and where they step out of it. Six visitors, one at a time.
OBSERVED_ENTRIES = [72, 244, 520, 763, 938, 1254]
OBSERVED_EXITS = [191, 438, 688, 858, 1188, 1348]
# Detection runs every 0.5 s (5 frames) and ByteTrack loses fast walkers near the edge, so an event
# may be up to one interval (plus debounce) off the observed frame.
TOLERANCE_FRAMES = 8

CONFIG = """
[detector]
model = "{model}"
interval_s = 0.5
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{out}/events.jsonl"
[sinks.stdout]
enabled = true
[state]
dir = "{out}/state"
[metrics]
enabled = false
[[cameras]]
id = "hall"
url = "{footage}"
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
anchor = "bottom_center"
"""


def write_config(tmp: Path, footage: Path, model: Path, extra: str = "") -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=model, out=tmp, footage=footage)) + extra)
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, footage, yolo_model, regionwatch_bin):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(tmp, footage, yolo_model)
    t0 = time.monotonic()
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - t0
    events = [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]
    print(f"\nfull run: {elapsed:.1f} s, {len(events)} events")
    return r, events, tmp


def test_exits_zero_and_stdout_matches_jsonl(full_run):
    r, events, _ = full_run
    assert r.returncode == 0, r.stderr[-2000:]
    stdout_events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert stdout_events == events
    assert "1394 frames processed" in r.stderr


def test_events_match_what_the_video_shows(full_run):
    _, events, _ = full_run
    entries = [e for e in events if e["type"] == "entry"]
    exits = [e for e in events if e["type"] == "exit"]
    assert len(entries) == len(OBSERVED_ENTRIES), [(e["type"], e["frame"]) for e in events]
    assert len(exits) == len(OBSERVED_EXITS)
    for got, want in zip(entries, OBSERVED_ENTRIES):
        assert abs(got["frame"] - want) <= TOLERANCE_FRAMES, (got["frame"], want)
    for got, want in zip(exits, OBSERVED_EXITS):
        assert abs(got["frame"] - want) <= TOLERANCE_FRAMES + 2, (got["frame"], want)
    # Each visit is one entry then one exit of the same track, with the right dwell.
    for en, ex in zip(entries, exits):
        assert en["track_id"] == ex["track_id"]
        assert en["frame"] < ex["frame"]
        assert ex["dwell_s"] == pytest.approx(ex["pts_s"] - en["pts_s"], abs=1e-3)
        assert ex["reason"] in ("left_region", "track_lost")
        assert en["region"] == "table" and en["camera"] == "hall"


def test_events_are_well_formed(full_run):
    _, events, _ = full_run
    validator = jsonschema.Draft202012Validator(json_schema())
    for e in events:
        validator.validate(e)
        assert abs(e["pts_s"] - e["frame"] / 10) < 1e-3
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == len(events)


def test_sigterm_stops_cleanly_and_flushes(tmp_path, footage, yolo_model, regionwatch_bin):
    cfg = write_config(tmp_path, footage, yolo_model)
    jsonl = tmp_path / "events.jsonl"
    p = subprocess.Popen([regionwatch_bin, "run", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (jsonl.exists() and jsonl.read_text().strip()):
            time.sleep(0.2)
        assert jsonl.read_text().strip(), "no entry event before the deadline"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err[-2000:]
    assert "received SIGTERM, stopping" in err
    assert "Traceback" not in err
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # The visitor inside when we stopped gets their exit, so consumers' occupancy ends at zero.
    assert [e["type"] for e in events] == ["entry", "exit"]
    assert events[1]["reason"] == "track_lost", [(e["type"], e["frame"], e.get("reason"), e["anchor"]) for e in events]


def test_bad_model_fails_before_anything_starts(tmp_path, footage, regionwatch_bin):
    bad = tmp_path / "w.onnx"
    bad.write_bytes(b"garbage")
    cfg = write_config(tmp_path, footage, bad)
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "detector.model: cannot load" in r.stderr
    assert not (tmp_path / "events.jsonl").exists() or not (tmp_path / "events.jsonl").read_text()


def test_a_file_that_is_not_video_exits_1_with_a_clear_error(tmp_path, yolo_model, regionwatch_bin):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    cfg = write_config(tmp_path, bad, yolo_model)
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "camera hall" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_a_short_visit_at_the_frame_edge_yields_an_entry_and_an_exit(tmp_path, footage, yolo_model, regionwatch_bin):
    """The sixth visitor leaves through the right edge of the picture, partly out of frame: their
    feet are in the strip along that edge for about 0.6 s (frames 1352-1358 of the footage,
    debounce 0.4 s). Cut to frames 1300-1393 so the run is short."""
    from helpers.video import cut_clip

    clip = tmp_path / "clip.mp4"
    cut_clip(footage, clip, 1394, start=1300)
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=yolo_model, out=tmp_path, footage=clip)) + textwrap.dedent("""
        [[cameras.regions]]
        id = "right_edge"
        polygon = [[640, 300], [768, 300], [768, 432], [640, 432]]
        """))
    r = subprocess.run([regionwatch_bin, "run", "--config", cfg], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    edge = [(e["type"], e["frame"] + 1300) for e in events if e["region"] == "right_edge"]
    assert [t for t, _ in edge] == ["entry", "exit"], events
    (_, entered), (_, left) = edge
    assert abs(entered - 1352) <= 2 and abs(left - 1358) <= 2, edge
