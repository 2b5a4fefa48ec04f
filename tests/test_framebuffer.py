"""daemon.framebuffer: handoff semantics (lossless / drop-oldest), rolling JPEG history bounds.

Uses real decoded frames from the sample footage where image content matters (JPEG sizes,
round trip); those skip with a clear message when ../shared/assets is absent (conftest ``footage``).
"""

from __future__ import annotations

import threading
import time

import av
import cv2
import numpy as np
import pytest

from daemon.config import CameraConfig
from daemon.framebuffer import SKIP_CONSUMER_BEHIND, FrameBuffer
from daemon.records import Frame

@pytest.fixture(scope="module")
def images(footage) -> list[np.ndarray]:
    """120 real BGR frames (every 3rd of the first 36 s of footage, for varied content)."""
    out = []
    with av.open(str(footage)) as c:
        for i, vf in enumerate(c.decode(video=0)):
            if i % 3 == 0:
                out.append(vf.to_ndarray(format="bgr24"))
            if len(out) == 120:
                break
    return out


def frame(i: int, image: np.ndarray | None = None, fps: float = 10.0) -> Frame:
    img = image if image is not None else np.full((16, 16, 3), i % 256, np.uint8)
    return Frame("cam", i, i / fps, 1000.0 + i / fps, img)


def test_lossless_put_blocks_until_consumer_takes():
    buf = FrameBuffer("cam", lossless=True, capacity=2)
    assert buf.put(frame(0)) and buf.put(frame(1))
    t0 = time.monotonic()
    assert not buf.put(frame(2), timeout=0.2), "a full lossless buffer must not accept more"
    assert time.monotonic() - t0 >= 0.19
    got = []
    consumer = threading.Thread(target=lambda: [got.append(buf.get(timeout=5).index) for _ in range(5)])
    consumer.start()
    for i in range(2, 5):
        assert buf.put(frame(i), timeout=5)
    consumer.join(10)
    assert got == [0, 1, 2, 3, 4]
    assert buf.counts().skipped == {}
    buf.close()
    assert buf.join(5)


def test_live_drops_oldest_and_counts_skips():
    skips = []
    buf = FrameBuffer("cam", lossless=False, capacity=4, on_skip=lambda reason, n: skips.append((reason, n)))
    for i in range(50):
        assert buf.put(frame(i))  # never blocks
    c = buf.counts()
    assert c.skipped == {SKIP_CONSUMER_BEHIND: 46}
    assert sum(n for _, n in skips) == 46 and {r for r, _ in skips} == {SKIP_CONSUMER_BEHIND}
    assert [buf.get(timeout=1).index for _ in range(4)] == [46, 47, 48, 49], "the freshest frames are kept"
    assert buf.get(timeout=0.05) is None
    buf.close()
    assert buf.join(5)
    c = buf.counts()
    # Every frame either reached the history encoder or was counted as skipped there.
    assert c.encoded + sum(c.history_skipped.values()) == 50


def test_bounds_hold_under_fast_producer_and_stalled_consumer(images):
    """Real frames at full speed, nobody consuming: queues and history stay within their bounds."""
    cap, buffer_s, buffer_mb = 8, 3.0, 0.5
    buf = FrameBuffer("cam", lossless=False, capacity=cap, buffer_s=buffer_s, buffer_mb=buffer_mb)
    high_pending = high_frames = high_bytes = 0
    span_over = []
    for i in range(600):
        buf.put(frame(i, images[i % len(images)]))
        c = buf.counts()
        n, nbytes = buf.stats()
        high_pending = max(high_pending, c.pending + c.to_encode)
        high_frames, high_bytes = max(high_frames, n), max(high_bytes, nbytes)
        hist = buf.history()
        if hist and hist[-1].pts_s - hist[0].pts_s > buffer_s:
            span_over.append(i)
    buf.flush(10)
    assert high_pending <= 2 * cap, "raw frames held must stay bounded"
    assert high_bytes <= buffer_mb * 1024 * 1024
    assert not span_over, "history older than buffer_s"
    c = buf.counts()
    assert c.skipped[SKIP_CONSUMER_BEHIND] == 600 - cap
    assert c.encoded + sum(c.history_skipped.values()) == 600
    hist = buf.history()
    assert [f.index for f in hist] == sorted(f.index for f in hist)
    assert hist[-1].index == 599, "the newest frame is always kept"
    buf.close()
    assert buf.join(5)


def test_history_bounded_by_seconds_then_by_megabytes(images):
    buf = FrameBuffer("cam", lossless=True, capacity=4, buffer_s=2.0, buffer_mb=64)
    consumer = threading.Thread(target=lambda: [buf.get(timeout=5) for _ in range(100)])
    consumer.start()
    for i in range(100):
        assert buf.put(frame(i, images[i]))
    consumer.join(10)
    buf.flush(10)
    hist = buf.history()
    assert [f.index for f in hist] == list(range(hist[0].index, 100)), "contiguous, newest kept"
    assert 1.9 <= hist[-1].pts_s - hist[0].pts_s <= 2.0, "the last buffer_s seconds, no more"
    one_frame = len(hist[-1].jpeg)

    small = FrameBuffer("cam", lossless=False, capacity=4, buffer_s=60.0, buffer_mb=5 * one_frame / 2**20)
    for i in range(40):
        small.put(frame(i, images[i]))
        small.flush(10)
    n, nbytes = small.stats()
    assert nbytes <= 5 * one_frame * 1.0001 and 3 <= n <= 6
    assert small.history()[-1].index == 39
    for b in (buf, small):
        b.close()
        assert b.join(5)


def test_jpeg_round_trip_and_quality(images):
    img = images[40]
    sizes = {}
    for q in (50, 95):
        buf = FrameBuffer("cam", lossless=True, jpeg_quality=q)
        item = buf.remember(frame(7, img))
        assert (item.index, item.pts_s, item.wall_time) == (7, 0.7, 1000.7)
        back = item.decode()
        assert back.shape == img.shape
        sizes[q] = len(item.jpeg)
        psnr = cv2.PSNR(img, back)
        assert psnr > (30 if q == 95 else 25), psnr
    assert sizes[95] > 1.5 * sizes[50]


def test_remember_returns_the_encoded_frame_and_fills_gaps(images):
    buf = FrameBuffer("cam", lossless=True, capacity=4)
    frames = [frame(i, images[i]) for i in range(4)]
    for f in frames:
        buf.put(f)
    got = [buf.get(timeout=1) for _ in range(4)]
    items = [buf.remember(f) for f in got]
    assert [it.index for it in items] == [0, 1, 2, 3]
    assert buf.counts().encoded == 4, "remember must not encode again what the encoder did"
    assert items[2] is buf.find(2)
    # A frame the history never saw (e.g. the encoder skipped it) is encoded and slotted in order.
    late = buf.remember(Frame("cam", 10, 1.0, 1001.0, images[10]))
    mid = buf.remember(Frame("cam", 5, 0.5, 1000.5, images[5]))
    assert [f.index for f in buf.history()] == [0, 1, 2, 3, 5, 10]
    assert buf.latest() is late and buf.nearest(0.52) is mid and buf.find(4) is None
    assert [f.index for f in buf.history(since_index=3)] == [5, 10]
    buf.close()
    assert buf.join(5)


def test_close_drains_then_ends():
    buf = FrameBuffer("cam", lossless=True, capacity=4)
    buf.put(frame(0))
    buf.put(frame(1))
    buf.close()
    assert not buf.put(frame(2)), "closed buffers refuse frames"
    assert not buf.closed, "pending frames are still to be taken"
    assert [buf.get(timeout=1).index, buf.get(timeout=1).index] == [0, 1]
    assert buf.get(timeout=1) is None and buf.closed
    assert buf.join(5)
    assert [f.index for f in buf.history()] == [0, 1]


def test_close_unblocks_a_waiting_producer_and_consumer():
    buf = FrameBuffer("cam", lossless=True, capacity=1)
    buf.put(frame(0))
    results = {}
    producer = threading.Thread(target=lambda: results.setdefault("put", buf.put(frame(1))))
    producer.start()
    time.sleep(0.1)
    buf.close()
    producer.join(5)
    assert results["put"] is False
    empty = FrameBuffer("cam", lossless=False)
    consumer = threading.Thread(target=lambda: results.setdefault("get", empty.get()))
    consumer.start()
    time.sleep(0.1)
    empty.close()
    consumer.join(5)
    assert not consumer.is_alive() and results["get"] is None


def test_for_camera_follows_config(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    live = FrameBuffer.for_camera(
        CameraConfig(id="door", url="rtsp://cam/1", queue_frames=3, buffer_s=4, buffer_mb=2, jpeg_quality=60)
    )
    assert (live.lossless, live.capacity, live.buffer_s, live.max_bytes, live.jpeg_quality) == (
        False,
        3,
        4.0,
        2 * 1024 * 1024,
        60,
    )
    assert FrameBuffer.for_camera(CameraConfig(id="f", url=str(clip))).lossless
    assert not FrameBuffer.for_camera(CameraConfig(id="f", url=str(clip), realtime=True)).lossless


# -- recent frames kept decoded, JPEG on demand (the daemon's default) --------------------------------
def _take(buf: FrameBuffer, frames) -> list:
    got = []
    for f in frames:
        assert buf.put(f)
        got.append(buf.get(timeout=1))
    return got


def test_recent_frames_are_kept_as_decoded_and_encoded_only_when_read(images):
    cpu: list[float] = []
    buf = FrameBuffer("cam", lossless=False, encode_all=False, recent_s=1.0, on_cpu=cpu.append)
    _take(buf, [frame(i, images[i]) for i in range(30)])  # 3 s at 10 fps
    c = buf.counts()
    assert c.encoded == 0 and cpu == [], "nothing is encoded until someone reads a frame"
    held = buf.history()
    assert [f.index for f in held] == list(range(19, 30)), "the last recent_s seconds the pipeline took"
    assert (c.recent, c.recent_bytes) == (11, 11 * images[0].nbytes) and buf.stats() == (11, 11 * images[0].nbytes)
    f = buf.find(25)
    image = f.decode()
    assert np.array_equal(image, images[25]), "the decoded frame itself, not a JPEG round trip"
    image[:] = 0
    assert np.array_equal(buf.find(25).decode(), images[25]), "readers get a copy they may draw on"
    assert cv2.PSNR(images[25], cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR)) > 30
    assert f.jpeg is f.jpeg and buf.counts().encoded == 1, "encoded once, on first read"
    assert len(cpu) == 1 and cpu[0] > 0
    assert buf.latest().index == 29 and buf.nearest(2.04).index == 20 and buf.find(3) is None
    assert buf.remember(frame(27, images[27])) is buf.find(27) and buf.counts().encoded == 1
    assert buf.flush(0.1), "no encoder thread to wait for"


def test_frames_the_pipeline_never_took_are_not_kept(images):
    buf = FrameBuffer("cam", lossless=False, capacity=2, encode_all=False)
    for i in range(10):
        buf.put(frame(i, images[i]))
    taken = [buf.get(timeout=1).index for _ in range(2)]
    assert taken == [8, 9] and [f.index for f in buf.history()] == [8, 9]
    assert buf.counts().skipped == {SKIP_CONSUMER_BEHIND: 8}


def test_recent_frames_bounded_by_megabytes(images):
    buf = FrameBuffer("cam", lossless=False, encode_all=False, recent_s=60, buffer_s=60,
                      buffer_mb=5.5 * images[0].nbytes / 2**20)
    _take(buf, [frame(i, images[i]) for i in range(20)])
    assert [f.index for f in buf.history()] == [15, 16, 17, 18, 19]


def test_keep_history_encodes_every_frame_again(images):
    cpu: list[float] = []
    buf = FrameBuffer.for_camera(CameraConfig(id="door", url="rtsp://cam/1"), on_cpu=cpu.append)
    assert not buf.encode_all
    buf.keep_history()  # what entry refinement asks for
    _take(buf, [frame(i, images[i]) for i in range(6)])
    assert buf.flush(10) and buf.counts().encoded == 6 and len(cpu) == 6
    assert [f.index for f in buf.history()] == list(range(6)) and buf.counts().recent == 0
    buf.close()
    assert buf.join(5)
