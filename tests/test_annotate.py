"""``regionwatch annotate`` on the real sample footage, through the real CLI, model and encoder.

To keep CI time modest the main run uses the footage's first 100 frames (the first visitor walks
in and stops at the table: entry around frame 75), cut into a temporary clip with PyAV; a second
run uses the full file with ``--max-frames`` and a pseudo-terminal for the progress bar.
"""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import textwrap
import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from daemon.annotate import Mp4Writer, ProgressBar, VideoInfo
from daemon.draw import ENTRY_COLOR, REGION_COLOR, ColorPalette
from helpers.video import cut_clip

REPO = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 100
POLYGON = [[360, 330], [560, 330], [560, 412], [360, 412]]

CONFIG = """
[detector]
model = "{model}"
interval_s = 0.5
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{tmp}/events.jsonl"
[state]
dir = "{tmp}/state"
[[cameras]]
id = "hall"
url = "{video}"
realtime = true
[[cameras.regions]]
id = "table"
polygon = {polygon}
[[cameras]]
id = "door"
url = "rtsp://user:secret@192.0.2.10/stream1"
"""


def decode(path: Path) -> tuple[list[np.ndarray], dict]:
    """Every frame (BGR), and the stream's codec, size and average rate."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(s)]
        info = {"codec": s.codec_context.name, "size": (s.codec_context.width, s.codec_context.height),
                "rate": s.average_rate}
        return frames, info


def region_mask(shape, erode: int = 9) -> np.ndarray:
    m = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(m, [np.array(POLYGON, np.int32)], 1)
    return cv2.erode(m, np.ones((erode, erode), np.uint8)).astype(bool)


def near(img: np.ndarray, color, tol: int) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(color)).max(axis=-1) <= tol


def annotate_cli(*args, **kw) -> subprocess.CompletedProcess:
    if "stderr" not in kw:
        kw["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "daemon", "annotate", *map(str, args)], cwd=REPO,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, footage, yolo_model):
    tmp = tmp_path_factory.mktemp("annotate")
    clip = tmp / "clip.mp4"
    cut_clip(footage, clip, CLIP_FRAMES)
    cfg = tmp / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=yolo_model, tmp=tmp, video=clip, polygon=POLYGON)))
    return tmp, clip, cfg


@pytest.fixture(scope="module")
def clip_run(setup):
    tmp, clip, cfg = setup
    out = tmp / "out" / "annotated.mp4"
    r = annotate_cli("--config", cfg, "--camera", "hall", "--output", out)
    return r, out, clip


def test_exits_zero_quietly_with_a_summary(clip_run, setup):
    r, out, _ = clip_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {out}: {CLIP_FRAMES} frames, 768x432 at 10 frames/s" in r.stdout
    assert "1 entry, 0 exits drawn" in r.stdout  # the first visitor reaches the table
    assert "\r" not in r.stderr and "frames/s" not in r.stderr  # not a terminal: no progress bar
    assert not (out.parent / (out.name + ".part")).exists()
    # It published nothing: no events file, no state of the configured daemon touched.
    tmp = setup[0]
    assert not (tmp / "events.jsonl").exists() and not (tmp / "state").exists()


def test_output_is_h264_with_the_inputs_frames_size_and_rate(clip_run):
    _, out, clip = clip_run
    frames, s = decode(out)
    src_frames, src = decode(clip)
    assert s["codec"] == "h264"
    assert len(frames) == len(src_frames) == CLIP_FRAMES
    assert s["size"] == src["size"] == (768, 432)
    assert s["rate"] == src["rate"] == 10
    assert VideoInfo.probe(out) == VideoInfo.probe(clip)


def test_region_is_tinted_and_the_rest_left_alone(clip_run):
    _, out, clip = clip_run
    frames, _ = decode(out)
    src, _ = decode(clip)
    inside = region_mask(src[0].shape)
    wall = np.zeros(inside.shape, bool)
    wall[40:220, 150:330] = True  # away from every drawing
    for i in (0, 30, 60, 90):
        diff = frames[i].astype(int) - src[i].astype(int)
        # The floor there is about BGR (28, 70, 129): tinting red raises red and lowers green.
        assert diff[inside][:, 2].mean() > 12 and diff[inside][:, 1].mean() < -3, i
        assert np.abs(diff[wall]).mean() < 2.0, i  # only H.264 noise elsewhere
    outline = near(frames[0], REGION_COLOR, 45)
    assert outline[405:415, 360:560].sum() > 150  # the region's bottom edge


def test_people_boxes_and_the_entry_banner_are_drawn(clip_run):
    _, out, clip = clip_run
    frames, _ = decode(out)
    src, _ = decode(clip)
    blue = ColorPalette.default().by_id(1)  # the first (and only) track
    # The visitor walks in from the right around frame 65 and is tracked from then on.
    boxed = [i for i in range(CLIP_FRAMES) if near(frames[i], blue, 40).sum() > 600]
    assert boxed and 55 <= boxed[0] <= 80 and boxed == list(range(boxed[0], CLIP_FRAMES)), boxed
    assert all(near(src[i], blue, 40).sum() < 100 for i in boxed)
    assert near(frames[5], blue, 40).sum() < 100  # nobody there yet
    # The entry (observed at frame 72-75) shows a green banner in the top-right corner for 2 s.
    banner = [i for i in range(CLIP_FRAMES) if near(frames[i][:80, 450:], ENTRY_COLOR, 40).sum() > 300]
    assert banner and 70 <= banner[0] <= 90 and 15 <= len(banner) <= 25, banner


def test_max_frames_with_a_progress_bar_on_a_terminal(setup, footage, tmp_path):
    _, _, cfg = setup
    # Same config, but the camera is the whole 1394-frame file; stop after 30 frames.
    cfg2 = tmp_path / "full.toml"
    cfg2.write_text(cfg.read_text().replace(str(setup[1]), str(footage)))
    out = tmp_path / "first30.mp4"
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        r = annotate_cli("--config", cfg2, "--camera", "hall", "--output", out, "--max-frames", 30, stderr=slave,
                         stdout=subprocess.PIPE)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert r.returncode == 0, tty[-3000:]
    assert "30 frames" in r.stdout
    assert "annotate hall [" in tty and "frames/s" in tty and "ETA" in tty and "30/30 frames" in tty
    frames, s = decode(out)
    assert len(frames) == 30 and s["rate"] == 10 and s["size"] == (768, 432)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--camera", "nope"], "no camera 'nope'"),
        (["--camera", "door"], "is a live stream (rtsp://***:***@192.0.2.10/stream1)"),
        ([], "the config has 2 cameras; pick one with --camera"),
        (["--camera", "hall", "--max-frames", "0"], "--max-frames must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(setup, tmp_path, args, message):
    _, _, cfg = setup
    r = annotate_cli("--config", cfg, "--output", tmp_path / "x.mp4", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and "secret" not in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_progress_bar_only_on_terminals():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet, loud = io.StringIO(), Tty()
    for stream in (quiet, loud):
        bar = ProgressBar(200, stream=stream, min_interval_s=0)
        for _ in range(50):
            bar.update()
        bar.close()
    assert quiet.getvalue() == ""
    text = loud.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert "50/200 frames" in last and "25%" in last and "frames/s" in last and "ETA" in last
    assert "[######------------------]" in last


def test_writer_keeps_variable_timing_and_odd_sizes(tmp_path):
    path = tmp_path / "odd.mp4"
    w = Mp4Writer(path, 65, 49, Fraction(25))
    times = [0.0, 0.04, 0.2, 0.24, 0.24]  # a gap, then a duplicate timestamp
    for t in times:
        w.write(np.full((49, 65, 3), 90, np.uint8), t)
    w.close()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = [f.pts * f.time_base for f in c.decode(s)]
        assert (s.codec_context.width, s.codec_context.height) == (65, 49)
    assert [float(p) for p in pts] == pytest.approx([0.0, 0.04, 0.2, 0.24, 0.28])
