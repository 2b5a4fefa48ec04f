"""daemon.sources against real footage and a real GStreamer RTSP server.

The RTSP server (tests/rtsp_server.py, driven by tests/helpers/rtsp.py) runs under the SYSTEM
python, /usr/bin/python3, which has python3-gi and gir1.2-gst-rtsp-server-1.0 (apt packages; they
are not in the virtualenv). Tests that need it skip with the reason when it is missing; tests that
need the footage (the ``footage`` fixture of conftest.py) skip when ../shared/assets is absent.

Every fault test runs a second, healthy camera beside the faulty one and checks that it keeps
producing frames, that the faulty camera recovers within the bounds its (small) timeouts and
backoff allow, and that repeated faults do not grow the process's threads or file descriptors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import CameraConfig
from daemon.framebuffer import FrameBuffer
from daemon.sources import FileSource, LiveSource, SourceState, Timeline, open_source
from helpers.rtsp import RtspServer, free_port, rtsp_server_unavailable

FOOTAGE_FRAMES = 1394
FOOTAGE_FPS = 10.0

# Small timeouts and backoff so faults resolve in seconds.
FAST = dict(open_timeout_s=2.0, read_timeout_s=2.0, stall_timeout_s=2.0, reconnect_base_s=0.2, reconnect_max_s=1.0)
# A fault is noticed within the read/stall timeout (+ scheduling slack).
DETECT_BOUND_S = FAST["stall_timeout_s"] + 1.0
# Once the server is back: at worst an attempt that started while it was away times out (open +
# stream probe, 2 x open_timeout), then the longest backoff wait, then a good open (the 1 s
# stream probe) and the first frame.
RECOVERY_BOUND_S = 2 * FAST["open_timeout_s"] + FAST["reconnect_max_s"] + 2.0

RECOVERY_TIMES: dict[str, list[float]] = {}  # printed at the end of the module (pytest -s)


# -- fixtures and helpers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtsp_available() -> None:
    why = rtsp_server_unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture
def servers(footage, rtsp_available):
    """Factory of RTSP servers serving the footage; all are stopped at the end of the test."""
    made: list[RtspServer] = []

    def make(start: bool = True, **kw) -> RtspServer:
        srv = RtspServer(footage, **kw)
        made.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture(scope="module")
def healthy_server(footage, rtsp_available):
    """The other camera's server, untouched by the faults (real time: 139 s of footage per session)."""
    with RtspServer(footage) as srv:
        yield srv


class Camera:
    """A source plus a consumer thread that drains its buffer, recording what happened."""

    def __init__(self, source_cls, name: str, url: str, *, lossless: bool = False, **kw):
        self.buffer = FrameBuffer(name, lossless=lossless, capacity=16, buffer_s=5.0)
        self.frames: list[tuple[int, float, float, int]] = []  # index, pts_s, monotonic, reconnects
        self.states: list[tuple[float, SourceState]] = []
        self.reconnect_calls: list[int] = []
        if source_cls is LiveSource:
            kw["on_reconnect"] = self.reconnect_calls.append
        self.source = source_cls(name, url, self.buffer, on_frame=self._on_frame, on_state=self._on_state, **kw)
        self.consumed = 0
        self._consumer = threading.Thread(target=self._consume, name=f"consumer-{name}", daemon=True)

    def _on_frame(self, frame, decode_s) -> None:
        assert decode_s >= 0
        self.frames.append((frame.index, frame.pts_s, time.monotonic(), self.source.reconnects))

    def _on_state(self, state) -> None:
        self.states.append((time.monotonic(), state))

    def _consume(self) -> None:
        while not self.buffer.closed:
            if self.buffer.get(timeout=0.2) is not None:
                self.consumed += 1

    def start(self) -> Camera:
        self.source.start()
        self._consumer.start()
        return self

    def stop(self) -> None:
        assert self.source.stop(timeout=FAST["read_timeout_s"] + 3), "source thread did not stop"
        self._consumer.join(5)
        assert not self._consumer.is_alive()
        assert self.buffer.join(5), "encoder thread did not stop"

    @property
    def count(self) -> int:
        return len(self.frames)

    def wait_frames(self, n: int, timeout: float) -> float:
        """Wait until ``n`` more frames than now arrived; returns the wait (seconds)."""
        target = self.count + n
        return wait_until(lambda: self.count >= target, timeout, f"{self.source.camera}: {n} frames")

    def check_timeline(self) -> None:
        idx = [f[0] for f in self.frames]
        assert idx == list(range(len(idx))), "frame indices must increase by one across reconnects"
        pts = np.array([f[1] for f in self.frames])
        assert np.all(np.diff(pts) > 0), "pts_s must be strictly increasing per camera"


def wait_until(pred, timeout: float, what: str, interval: float = 0.01) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def resources() -> tuple[int, int]:
    """(threads, open file descriptors) of this process, native threads included.

    The minimum over half a second: a joined thread's OS thread may take a moment to vanish.
    """
    reads = []
    for _ in range(10):
        reads.append((len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))))
        time.sleep(0.05)
    return min(r[0] for r in reads), min(r[1] for r in reads)


def assert_no_growth(samples: list[tuple[int, int]]) -> None:
    """Samples taken at the same point of each fault cycle must not grow."""
    first, last = samples[0], samples[-1]
    assert last[0] <= first[0], f"threads grew across faults: {samples}"
    assert last[1] <= first[1], f"file descriptors grew across faults: {samples}"


@pytest.fixture
def healthy(healthy_server):
    cam = Camera(LiveSource, "healthy", healthy_server.url(), **FAST).start()
    cam.wait_frames(5, 15)
    yield cam
    cam.stop()
    assert cam.source.reconnects == 0, "the healthy camera must never have reconnected"
    cam.check_timeline()


def healthy_progress(cam: Camera, since: int, seconds: float) -> None:
    """The healthy camera kept streaming at ~10 fps over the last ``seconds``."""
    assert cam.source.state is SourceState.STREAMING
    assert cam.count - since >= 0.5 * FOOTAGE_FPS * seconds, (cam.count - since, seconds)


def record(fault: str, seconds: float) -> None:
    RECOVERY_TIMES.setdefault(fault, []).append(round(seconds, 2))


@pytest.fixture(scope="module", autouse=True)
def _report_recovery_times():
    yield
    for fault, times in RECOVERY_TIMES.items():
        print(f"\nrecovery {fault}: {times} s")


# -- RTSP ----------------------------------------------------------------------------------
SECRET = "s3cr:t@x/"


def test_rtsp_frame_count_and_timestamps(servers, caplog):
    """The whole clip over RTSP (8x speed): every frame, exact pts steps; end of stream is a disconnect."""
    caplog.set_level(logging.DEBUG, logger="daemon.sources")
    speed = 8.0
    srv = servers(speed=speed, user="viewer", password=SECRET)
    cam = Camera(LiveSource, "hall", srv.url("viewer", SECRET), **FAST).start()
    try:
        wait_until(lambda: cam.source.reconnects >= 1, FOOTAGE_FRAMES / FOOTAGE_FPS / speed + 20, "end of stream")
        cam.wait_frames(5, RECOVERY_BOUND_S)
    finally:
        cam.stop()

    first = [f for f in cam.frames if f[3] == 0]
    assert len(first) == FOOTAGE_FRAMES
    pts = np.array([f[1] for f in first])
    step = 1.0 / (FOOTAGE_FPS * speed)
    assert pts[0] == 0.0
    # The first RTP packet carries no usable pts (None); every later step is the stream's own.
    np.testing.assert_allclose(np.diff(pts[1:]), step, atol=1e-4)
    cam.check_timeline()
    # After the reconnect the server's clock restarted at 0: pts_s continues from the wall-clock gap.
    last, nxt = first[-1], cam.frames[len(first)]
    assert nxt[1] - last[1] == pytest.approx(nxt[2] - last[2], abs=1.0)
    assert any("end of stream" in r.getMessage() for r in caplog.records)
    S = SourceState
    states = [s for _, s in cam.states]
    assert states[:5] == [S.CONNECTING, S.STREAMING, S.RECONNECTING, S.CONNECTING, S.STREAMING]
    # Credentials never leak.
    text = caplog.text + repr(cam.source.error) + cam.source.safe_url
    assert SECRET not in text and "s3cr" not in text
    assert cam.source.safe_url.startswith("rtsp://***:***@127.0.0.1:")
    assert cam.consumed > 0


def test_wrong_password_retries_and_redacts(servers, caplog):
    caplog.set_level(logging.DEBUG, logger="daemon.sources")
    srv = servers(user="viewer", password="right")
    cam = Camera(LiveSource, "door", srv.url("viewer", "hunter2-wrong"), **FAST).start()
    try:
        wait_until(lambda: cam.source.reconnects >= 3, 10, "3 reconnects")
        assert cam.count == 0
        assert cam.source.state in (SourceState.RECONNECTING, SourceState.CONNECTING)
        assert "401 Unauthorized" in cam.source.error
        assert "door" in cam.source.error and "rtsp://***:***@127.0.0.1" in cam.source.error
        status = cam.source.status()
        assert status["state"] in ("reconnecting", "connecting") and status["reconnects"] >= 3
        assert status["url"].startswith("rtsp://***:***@") and status["fps"] == 0.0
    finally:
        cam.stop()
    assert "hunter2" not in caplog.text + repr(cam.source.error)
    assert not any(r.exc_info for r in caplog.records), "no tracebacks for expected failures"


def test_server_killed_mid_stream_then_restarted(servers, healthy, caplog):
    caplog.set_level(logging.INFO, logger="daemon.sources")
    srv = servers()
    cam = Camera(LiveSource, "door", srv.url(), **FAST).start()
    samples = []
    try:
        cam.wait_frames(10, 15)
        for _ in range(3):
            h0, t_fault = healthy.count, time.monotonic()
            srv.kill()
            wait_until(lambda: cam.source.state is not SourceState.STREAMING, DETECT_BOUND_S, "disconnect")
            record("killed: detected", time.monotonic() - t_fault)
            time.sleep(1.5)  # down for a while: it keeps retrying
            assert cam.source.alive and cam.source.state is not SourceState.STREAMING
            assert "Connection refused" in cam.source.error or "end of stream" in cam.source.error
            srv.start()
            t_back = time.monotonic()
            cam.wait_frames(1, RECOVERY_BOUND_S)
            record("killed: recovered after restart", time.monotonic() - t_back)
            healthy_progress(healthy, h0, time.monotonic() - t_fault)
            cam.wait_frames(5, 5)
            samples.append(resources())
    finally:
        cam.stop()
    assert cam.source.reconnects >= 3
    cam.check_timeline()
    assert_no_growth(samples)


def test_server_hung_then_resumed(servers, healthy):
    srv = servers()
    cam = Camera(LiveSource, "door", srv.url(), **FAST).start()
    samples = []
    try:
        cam.wait_frames(10, 15)
        for _ in range(2):
            h0, t_fault = healthy.count, time.monotonic()
            srv.pause()  # SIGSTOP: the connection stays open, nothing arrives
            wait_until(lambda: cam.source.state is not SourceState.STREAMING, DETECT_BOUND_S, "stall detected")
            record("hung: detected", time.monotonic() - t_fault)
            time.sleep(2.5)  # at least one reconnect attempt times out against the hung server
            assert cam.source.alive and cam.source.state is not SourceState.STREAMING
            srv.resume()
            t_back = time.monotonic()
            cam.wait_frames(1, RECOVERY_BOUND_S)
            record("hung: recovered after SIGCONT", time.monotonic() - t_back)
            healthy_progress(healthy, h0, time.monotonic() - t_fault)
            cam.wait_frames(5, 5)
            samples.append(resources())
        # Stopping is prompt even while blocked on a hung server.
        srv.pause()
        time.sleep(0.5)
        t0 = time.monotonic()
        assert cam.source.stop(timeout=FAST["read_timeout_s"] + 2)
        record("hung: stop() while blocked", time.monotonic() - t0)
    finally:
        srv.resume()
        cam.stop()
    cam.check_timeline()
    assert_no_growth(samples)


def test_server_absent_at_start_then_appearing(servers, healthy):
    port = free_port()
    srv = servers(start=False, port=port)
    h0, t0 = healthy.count, time.monotonic()
    cam = Camera(LiveSource, "door", srv.url(), **FAST).start()
    try:
        wait_until(lambda: cam.source.reconnects >= 3, 10, "retries while absent")
        assert cam.count == 0 and "Connection refused" in cam.source.error
        srv.start()
        t_back = time.monotonic()
        cam.wait_frames(1, RECOVERY_BOUND_S)
        record("absent at start: streaming after server appeared", time.monotonic() - t_back)
        healthy_progress(healthy, h0, time.monotonic() - t0)
    finally:
        cam.stop()
    assert cam.frames[0][0] == 0 and cam.frames[0][1] == 0.0
    cam.check_timeline()
    states = [s for _, s in cam.states]
    assert states[:3] == [SourceState.CONNECTING, SourceState.RECONNECTING, SourceState.CONNECTING]
    assert states[-2:] == [SourceState.STREAMING, SourceState.STOPPED]
    assert cam.reconnect_calls == list(range(1, cam.source.reconnects + 1))


def test_wrong_mount_404_retries_quietly_until_mounted(servers, healthy, caplog):
    caplog.set_level(logging.DEBUG, logger="daemon.sources")
    srv = servers(defer_mount=True)
    h0, t0 = healthy.count, time.monotonic()
    cam = Camera(LiveSource, "door", srv.url(), **FAST).start()
    try:
        wait_until(lambda: cam.source.reconnects >= 6, 15, "404 retries")
        assert cam.count == 0 and cam.source.alive
        assert "404 Not Found" in cam.source.error and "door" in cam.source.error
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "404" in r.getMessage()]
        # Logged at attempts 1, 2, 4 (and 8, ...), not once per attempt; never with a traceback.
        assert 2 <= len(warnings) <= 4, [r.getMessage() for r in warnings]
        assert not any(r.exc_info for r in caplog.records)
        srv.add_mount()
        t_back = time.monotonic()
        cam.wait_frames(1, RECOVERY_BOUND_S)
        record("404: streaming after mount appeared", time.monotonic() - t_back)
        healthy_progress(healthy, h0, time.monotonic() - t0)
        assert cam.source.error is None
    finally:
        cam.stop()


# -- files ---------------------------------------------------------------------------------
def _truncated(footage: Path, tmp: Path) -> Path:
    p = tmp / "truncated.mp4"
    p.write_bytes(footage.read_bytes()[:700_000])  # moov + the first ~20 s of 139
    return p


def _zero_byte(footage: Path, tmp: Path) -> Path:
    p = tmp / "empty.mp4"
    p.write_bytes(b"")
    return p


def _not_video(footage: Path, tmp: Path) -> Path:
    p = tmp / "notes.mp4"
    p.write_text("camera notes, definitely not H.264\n" * 100)
    return p


@pytest.mark.parametrize(
    "make, message, frames",
    [
        (_truncated, "file ended early", "some"),
        (_zero_byte, "cannot open", "none"),
        (_not_video, "not a video file", "none"),
    ],
    ids=["truncated", "zero-byte", "not-video"],
)
def test_bad_file_ends_cleanly_with_a_clear_error(make, message, frames, footage, tmp_path, healthy, caplog):
    caplog.set_level(logging.DEBUG, logger="daemon.sources")
    path = make(footage, tmp_path)
    samples = []
    h0, t0 = healthy.count, time.monotonic()
    for _ in range(3):
        cam = Camera(FileSource, "shelf", str(path), lossless=True).start()
        wait_until(lambda: not cam.source.alive, 20, "file source to end")
        cam.stop()
        assert cam.source.state is SourceState.STOPPED
        assert message in cam.source.error
        assert cam.source.error.startswith(f"camera shelf: {path}")
        assert cam.buffer.closed
        assert (cam.count > 0) == (frames == "some")
        assert cam.consumed == cam.count  # lossless: every decoded frame reached the consumer
        samples.append(resources())
    cam.check_timeline()
    assert not any(r.exc_info for r in caplog.records), "no tracebacks for bad files"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all("shelf" in r.getMessage() for r in errors)
    healthy_progress(healthy, h0, time.monotonic() - t0)
    assert_no_growth(samples)


def test_file_source_is_lossless_with_exact_timestamps(footage):
    cam = Camera(FileSource, "hall", str(footage), lossless=True).start()
    wait_until(lambda: not cam.source.alive, 60, "end of file")
    cam.stop()
    assert cam.count == FOOTAGE_FRAMES and cam.consumed == FOOTAGE_FRAMES
    assert cam.source.error is None and cam.source.state is SourceState.STOPPED
    pts = np.array([f[1] for f in cam.frames])
    np.testing.assert_allclose(pts, np.arange(FOOTAGE_FRAMES) / FOOTAGE_FPS, atol=1e-6)
    cam.check_timeline()


def test_realtime_file_is_paced_at_native_rate(footage):
    cam = Camera(FileSource, "hall", str(footage), realtime=True).start()
    try:
        time.sleep(0.5)
        n0, t0 = cam.count, time.monotonic()
        time.sleep(2.0)
        rate = (cam.count - n0) / (time.monotonic() - t0)
        assert rate == pytest.approx(FOOTAGE_FPS, rel=0.2)
        assert cam.source.fps == pytest.approx(FOOTAGE_FPS, rel=0.2)
        assert cam.source.state is SourceState.STREAMING
    finally:
        cam.stop()
    assert not cam.source.alive and cam.source.state is SourceState.STOPPED
    assert cam.source.error is None, "stopping early is not an error"


def test_gif_decodes(footage):
    gif = footage.parent / "people-detection.gif"
    if not gif.is_file():
        pytest.skip(f"{gif} not found")
    cam = Camera(FileSource, "gif", str(gif), lossless=True).start()
    wait_until(lambda: not cam.source.alive, 30, "end of gif")
    cam.stop()
    assert cam.count > 0 and cam.source.error is None
    cam.check_timeline()


# -- factory, timeline ---------------------------------------------------------------------
def test_open_source_picks_file_or_live(footage):
    file_cfg = CameraConfig(id="hall", url=str(footage), realtime=True)
    src = open_source(file_cfg, FrameBuffer.for_camera(file_cfg))
    assert isinstance(src, FileSource) and src.realtime and not src.buffer.lossless

    live_cfg = CameraConfig(id="door", url="rtsp://admin:pw@10.0.0.5/s", rtsp_transport="udp", **FAST)
    src = open_source(live_cfg, FrameBuffer.for_camera(live_cfg))
    assert isinstance(src, LiveSource)
    opts = src.options()
    assert opts["rtsp_transport"] == "udp" and opts["timeout"] == "2000000"
    assert src.safe_url == "rtsp://***:***@10.0.0.5/s"
    assert (src.backoff.base_s, src.backoff.cap_s, src.stall_timeout_s) == (0.2, 1.0, 2.0)
    assert FrameBuffer.for_camera(CameraConfig(id="f", url=str(footage))).lossless


def test_timeline_handles_missing_pts_and_jumps():
    t = Timeline(live=True, jump_s=5.0)
    out = [t(None, 100.0), t(1000.0, 100.1), t(1000.1, 100.2)]
    out.append(t(2000.0, 100.3))  # pts jumped 1000 s in 0.1 s of wall time: re-anchored to the clock
    out.append(t(5.0, 100.4))  # pts went backwards
    out.append(t(None, 100.5))
    t.new_session()
    out.append(t(0.0, 130.0))  # after a 30 s outage
    assert np.all(np.diff(out) > 0)
    np.testing.assert_allclose(out, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 30.0], atol=1e-5)


def test_decode_cpu_is_reported_per_frame_on_one_decoder_thread(footage):
    """on_cpu gets the source thread's CPU for every frame; with one decoder thread that is all of it."""
    cpu: list[float] = []
    cfg = CameraConfig(id="hall", url=str(footage))
    buf = FrameBuffer.for_camera(cfg)
    src = open_source(cfg, buf, on_cpu=cpu.append)
    assert src.decode_threads == 1
    before = {t.native_id for t in threading.enumerate()}
    tasks0 = set(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else set()
    src.start()
    frames = [buf.get(timeout=10) for _ in range(100)]
    tasks = set(os.listdir("/proc/self/task")) if tasks0 else set()
    src.stop()
    assert all(f is not None for f in frames)
    assert len(cpu) >= 100 and all(c >= 0 for c in cpu) and sum(cpu) > 0
    # No codec worker threads were started: the decode thread is the only new one.
    new = {int(t) for t in tasks - tasks0} - before
    assert len(new) <= 1, new
