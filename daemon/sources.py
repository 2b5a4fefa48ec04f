"""Video sources: decode a file or a live stream with PyAV in a thread, feeding a :class:`FrameBuffer`.

* :class:`FileSource` decodes a file once, every frame (or paced at its native frame rate with
  ``realtime=True``), then closes the buffer. A file that cannot be opened or decoded ends the
  source with a one-line :attr:`~VideoSource.error`; it never raises into the daemon.
* :class:`LiveSource` (alias :data:`RtspSource`) reads an ``rtsp://`` (or any other network) URL
  and never gives up: open and read timeouts are always set, end-of-stream is a disconnect, and it
  reconnects forever with exponential backoff and jitter. A stall watchdog (no frame for
  ``stall_timeout_s``) forces a reconnect; a hung server cannot block it because every blocking
  read is interrupted after ``min(read_timeout_s, stall_timeout_s)``.
* :func:`open_source` picks one from a :class:`~daemon.config.CameraConfig`.

Frame indices keep increasing across reconnects and ``pts_s`` is monotonic per camera (see
:class:`Timeline`). Each camera decodes on one thread by default (``decode_threads = 1``): cameras
decode in parallel with each other, and threads inside one decoder only add synchronisation (and,
with frame threading, a frame of latency per thread) — see README "Capacity". The source thread's
CPU time (demux, decode, colour conversion, handoff) is reported through ``on_cpu(seconds)``. Each source exposes ``state`` (:class:`SourceState`), ``reconnects``,
``fps`` (measured) and ``error`` for metrics and health; URLs in logs and errors are redacted.

Example:
    >>> from daemon.framebuffer import FrameBuffer
    >>> buf = FrameBuffer("hall", lossless=True)
    >>> src = FileSource("hall", "../shared/assets/footage/one-by-one-person-detection.mp4", buf)
    >>> src.start(); f = buf.get(timeout=10); src.stop()
    True
    >>> (f.index, f.size, src.state.value)
    (0, (768, 432), 'stopped')
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Callable

import av

from daemon.framebuffer import FrameBuffer
from daemon.records import Frame
from daemon.redact import redact_url

if TYPE_CHECKING:
    from daemon.config import CameraConfig

log = logging.getLogger(__name__)

_EPS = 1e-6
_FPS_WINDOW_S = 5.0
_MAX_BAD_PACKETS = 200  # consecutive undecodable packets before a file is given up / a stream reconnects

OnFrame = Callable[[Frame, float], None]
OnState = Callable[["SourceState"], None]
OnReconnect = Callable[[int], None]
OnCpu = Callable[[float], object]


class SourceState(str, enum.Enum):
    """Where a source is: connecting (opening), streaming, reconnecting (waiting to retry), stopped."""

    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class Backoff:
    """Exponential backoff with jitter: try ``n`` waits a random time in ``[d/2, d]``, ``d = min(cap, base·2ⁿ)``.

    Example:
        >>> b = Backoff(1.0, 4.0, rng=random.Random(0))
        >>> [min(4.0, 2**n) / 2 <= b.next_delay() <= min(4.0, 2**n) for n in range(5)]
        [True, True, True, True, True]
        >>> b.reset(); b.next_delay() <= 1.0
        True
    """

    def __init__(self, base_s: float, cap_s: float, *, rng: random.Random | None = None):
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        d = min(self.cap_s, self.base_s * 2 ** min(self._attempt, 60))
        self._attempt += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self._attempt = 0


class Timeline:
    """Turns per-session stream timestamps into one monotonic time axis per camera (``pts_s``).

    Files start at 0 and follow the file's pts; a frame without pts continues at the frame rate.
    Live streams are anchored to the time since the camera's first frame: each new session (after
    a reconnect the server's clock restarts) is re-anchored there, and so is a session whose pts go
    backwards, jump by more than ``jump_s`` against the monotonic clock, or fall more than
    ``jump_s`` behind it. Frames without pts advance with the clock. Output never decreases.

    Example:
        >>> t = Timeline(live=True)
        >>> [round(t(raw, mono), 3) for raw, mono in [(None, 50.0), (7.1, 50.1), (7.2, 50.2)]]
        [0.0, 0.1, 0.2]
        >>> t.new_session()  # reconnected 10 s later; the server restarted its clock at 0
        >>> [round(t(raw, mono), 3) for raw, mono in [(0.0, 60.2), (0.1, 60.3)]]
        [10.2, 10.3]
        >>> f = Timeline(live=False, step_s=0.1)
        >>> [round(f(raw, 0.0), 3) for raw in (None, 2.5, 2.6)]
        [0.0, 0.1, 0.2]
    """

    def __init__(self, *, live: bool, step_s: float = 0.04, jump_s: float = 5.0):
        self.live = live
        self.step_s = step_s
        self.jump_s = jump_s
        self._origin: float | None = None
        self._offset: float | None = None
        self._last: float | None = None
        self._last_raw: float | None = None
        self._last_mono = 0.0

    def new_session(self) -> None:
        """The next frame comes from a new connection: its pts are unrelated to the last ones."""
        self._offset = None
        self._last_raw = None

    def __call__(self, raw: float | None, mono: float) -> float:
        if self._origin is None:
            self._origin = mono
        last = self._last
        floor = 0.0 if last is None else last + _EPS
        if not self.live:
            nxt = 0.0 if last is None else last + self.step_s
            if raw is None:
                p = nxt
            else:
                if self._offset is None:
                    self._offset = nxt - raw
                p = raw + self._offset
        else:
            elapsed = mono - self._origin
            if raw is not None and self._offset is not None and self._last_raw is not None:
                d_raw, d_wall = raw - self._last_raw, mono - self._last_mono
                if d_raw < 0 or abs(d_raw - d_wall) > self.jump_s or elapsed - (raw + self._offset) > self.jump_s:
                    self._offset = None
            if raw is None:
                p = elapsed if last is None else last + max(mono - self._last_mono, 0.0)
            elif self._offset is None:
                p = max(elapsed, floor)
                self._offset = p - raw
            else:
                p = raw + self._offset
            if raw is not None:
                self._last_raw = raw
        p = max(p, floor)
        self._last, self._last_mono = p, mono
        return p


def _describe(exc: BaseException) -> str:
    """A one-line, credential-free description of a PyAV / OS error."""
    if isinstance(exc, av.FFmpegError):
        text = exc.strerror or str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact_url(str(text))


class VideoSource:
    """What every source shares: a decode thread, state, counters and callbacks.

    ``on_frame(frame, decode_s)`` is called for every decoded frame before it is put into the
    buffer (``decode_s``: decode + colour conversion time); ``on_state(state)`` once when the thread
    starts and on every state change; ``on_reconnect(count)`` on every reconnect attempt;
    ``on_cpu(seconds)`` with the decode thread's CPU time since the last call, once per frame.
    ``decode_threads``: FFmpeg decoder threads (0 = FFmpeg's choice, one per core).
    """

    def __init__(
        self,
        camera: str,
        url: str,
        buffer: FrameBuffer,
        *,
        on_frame: OnFrame | None = None,
        on_state: OnState | None = None,
        on_reconnect: OnReconnect | None = None,
        on_cpu: OnCpu | None = None,
        decode_threads: int = 1,
    ):
        self.camera = camera
        self.url = url
        self.safe_url = redact_url(url)
        self.buffer = buffer
        self.state = SourceState.CONNECTING
        self.reconnects = 0
        self.error: str | None = None
        self.frames = 0
        self.last_frame_wall: float | None = None
        self._on_frame = on_frame or (lambda frame, decode_s: None)
        self._on_state = on_state or (lambda state: None)
        self._on_reconnect = on_reconnect or (lambda n: None)
        self._on_cpu = on_cpu
        self._cpu_mark = 0.0
        self.decode_threads = decode_threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"source-{camera}", daemon=True)
        self._index = 0
        self._frame_times: collections.deque[float] = collections.deque()
        self._fps = 0.0
        self._last_mono = 0.0
        self._last_wall = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop decoding and close the buffer. True if the thread ended within ``timeout``.

        A live source blocked in a network read ends on its own within its read timeout.
        """
        self._stop.set()
        self.buffer.close()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """True while the decode thread runs."""
        return self._thread.is_alive()

    @property
    def fps(self) -> float:
        """Frames per second over the last few seconds; 0 when frames stopped coming."""
        if not self._frame_times or time.monotonic() - self._last_mono > max(2.0, 3.0 / max(self._fps, 0.1)):
            return 0.0
        return self._fps

    def status(self) -> dict:
        """A snapshot for health checks and metrics (the URL redacted).

        Example:
            >>> src = FileSource("hall", "clip.mp4", FrameBuffer("hall", lossless=True))
            >>> src.status()["state"], src.status()["reconnects"]
            ('connecting', 0)
        """
        return {
            "camera": self.camera,
            "url": self.safe_url,
            "state": self.state.value,
            "reconnects": self.reconnects,
            "fps": round(self.fps, 2),
            "frames": self.frames,
            "last_frame_wall": self.last_frame_wall,
            "error": self.error,
        }

    # -- helpers for subclasses ----------------------------------------------------------
    def _main(self) -> None:
        self._cpu_mark = time.thread_time()
        self._notify(self.state)
        try:
            self._run()
        except Exception as e:  # a bug here must not take the daemon down or spam tracebacks
            self.error = f"camera {self.camera}: {self.safe_url}: unexpected {type(e).__name__}: {redact_url(str(e))}"
            log.exception("camera %s: source crashed", self.camera)
        finally:
            self._set_state(SourceState.STOPPED)
            self.buffer.close()

    def _run(self) -> None:
        raise NotImplementedError

    def _set_state(self, state: SourceState) -> None:
        if state is not self.state:
            self.state = state
            self._notify(state)

    def _notify(self, state: SourceState) -> None:
        try:
            self._on_state(state)
        except Exception:
            log.exception("camera %s: on_state callback failed", self.camera)

    def _deliver(self, image, pts_s: float, wall_time: float, decode_s: float, mono: float) -> bool:
        """Wrap, announce and buffer one decoded frame. False once the buffer is closed."""
        frame = Frame(self.camera, self._index, pts_s, wall_time, image)
        self._index += 1
        self.frames += 1
        self.last_frame_wall = wall_time
        times = self._frame_times
        times.append(mono)
        while len(times) > 2 and mono - times[0] > _FPS_WINDOW_S:
            times.popleft()
        span = times[-1] - times[0]
        self._fps = (len(times) - 1) / span if span > 0 else 0.0
        self._last_mono = mono
        self._on_frame(frame, decode_s)
        if self._on_cpu is not None:
            now = time.thread_time()
            self._on_cpu(now - self._cpu_mark)
            self._cpu_mark = now
        if self.buffer.put(frame):
            return True
        self._stop.set()  # whoever closed the buffer wants no more frames
        return False

    def _threading(self, stream) -> None:
        """Decoder threads: one by default; slice threads only (frame threads add latency)."""
        stream.thread_count = self.decode_threads
        stream.thread_type = "SLICE"

    def _decode_packet(self, packet) -> tuple[list, float]:
        """Decode one packet to BGR arrays: ([(image, raw pts seconds or None)], seconds per frame)."""
        t0 = time.perf_counter()
        out = []
        for vf in packet.decode():
            tb = vf.time_base
            raw = float(vf.pts * tb) if vf.pts is not None and tb else None
            out.append((vf.to_ndarray(format="bgr24"), raw))
        return out, (time.perf_counter() - t0) / max(len(out), 1)


class FileSource(VideoSource):
    """Decode a video file once, every frame.

    Without ``realtime`` frames go as fast as the consumer takes them; with it they are paced at
    the file's native frame rate, like a camera.
    """

    def __init__(
        self,
        camera: str,
        path: str,
        buffer: FrameBuffer,
        *,
        on_frame: OnFrame | None = None,
        on_state: OnState | None = None,
        on_cpu: OnCpu | None = None,
        realtime: bool = False,
        decode_threads: int = 1,
    ):
        super().__init__(
            camera, path, buffer, on_frame=on_frame, on_state=on_state, on_cpu=on_cpu, decode_threads=decode_threads
        )
        self.path = path.removeprefix("file://")
        self.realtime = realtime

    def _threading(self, stream) -> None:
        """Files not paced in real time may also use frame threads: throughput, not latency, counts."""
        stream.thread_count = self.decode_threads
        stream.thread_type = "SLICE" if self.realtime else "AUTO"

    def _fail(self, what: str) -> None:
        self.error = f"camera {self.camera}: {self.safe_url}: {what}"
        log.error("%s", self.error)

    def _run(self) -> None:
        self._set_state(SourceState.CONNECTING)
        try:
            container = av.open(self.path)
        except (av.FFmpegError, OSError) as e:
            hint = " (not a video file, empty or damaged?)" if isinstance(e, av.InvalidDataError) else ""
            return self._fail(f"cannot open: {_describe(e)}{hint}")
        with container:
            if not container.streams.video:
                return self._fail("no video stream in the file")
            stream = container.streams.video[0]
            self._threading(stream)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            expected = int(stream.frames or 0)
            timeline = Timeline(live=False, step_s=1.0 / rate)
            start_wall, start_mono = time.time(), time.monotonic()
            bad, last_bad = 0, ""
            try:
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        return
                    try:
                        decoded, decode_s = self._decode_packet(packet)
                        bad = 0
                    except av.FFmpegError as e:
                        bad, last_bad = bad + 1, _describe(e)
                        if bad >= _MAX_BAD_PACKETS:
                            return self._fail(f"{bad} undecodable packets in a row after {self.frames} frames: {last_bad}")
                        continue
                    for image, raw in decoded:
                        if self.state is not SourceState.STREAMING:
                            self._set_state(SourceState.STREAMING)
                        pts_s = timeline(raw, 0.0)
                        if self.realtime and self._stop.wait(max(0.0, start_mono + pts_s - time.monotonic())):
                            return
                        if not self._deliver(image, pts_s, start_wall + pts_s, decode_s, time.monotonic()):
                            return
            except av.FFmpegError as e:
                return self._fail(f"read failed after {self.frames} frames: {_describe(e)}")
            if self.frames == 0:
                return self._fail(f"no frame could be decoded{f' ({last_bad})' if last_bad else ''}")
            if expected and self.frames < expected:
                self._fail(f"file ended early: decoded {self.frames} of {expected} frames (truncated?)")


class _Stalled(Exception):
    pass


class LiveSource(VideoSource):
    """Read a live stream (``rtsp://`` and other network URLs) forever, reconnecting as needed.

    Example (needs a camera, so not run here)::

        buf = FrameBuffer("door", lossless=False)
        src = LiveSource("door", "rtsp://user:pw@10.0.0.5/stream1", buf, reconnect_max_s=10)
        src.start()
        frame = buf.get(timeout=15)       # None until the camera answers
        src.state, src.reconnects, src.fps
    """

    def __init__(
        self,
        camera: str,
        url: str,
        buffer: FrameBuffer,
        *,
        transport: str = "tcp",
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        reconnect_base_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        stall_timeout_s: float = 15.0,
        on_frame: OnFrame | None = None,
        on_state: OnState | None = None,
        on_reconnect: OnReconnect | None = None,
        on_cpu: OnCpu | None = None,
        rng: random.Random | None = None,
        decode_threads: int = 1,
    ):
        super().__init__(
            camera, url, buffer, on_frame=on_frame, on_state=on_state, on_reconnect=on_reconnect, on_cpu=on_cpu,
            decode_threads=decode_threads,
        )
        self.transport = transport
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = min(read_timeout_s, stall_timeout_s)
        self.stall_timeout_s = stall_timeout_s
        self.backoff = Backoff(reconnect_base_s, reconnect_max_s, rng=rng)
        self.timeline = Timeline(live=True)
        self.down_since: float | None = None
        self._connected = False

    def options(self) -> dict[str, str]:
        """The FFmpeg options used to open the URL."""
        opts = {"analyzeduration": "1000000"}
        if self.url.lower().startswith(("rtsp://", "rtsps://")):
            opts.update(
                rtsp_transport=self.transport,
                timeout=str(int(self.read_timeout_s * 1e6)),  # socket I/O timeout, microseconds
                allowed_media_types="video",
            )
        return opts

    def _run(self) -> None:
        last_reason: str | None = None
        while not self._stop.is_set():
            self._set_state(SourceState.CONNECTING)
            self._connected = False
            try:
                reason = self._session()
            except (_Stalled, av.FFmpegError, OSError) as e:
                reason = str(e) if isinstance(e, _Stalled) else _describe(e)
            except Exception as e:  # a bug must not end a camera for good: log it once, retry
                reason = f"unexpected {type(e).__name__}: {redact_url(str(e))}"
                if reason != last_reason:
                    log.exception("camera %s: %s", self.camera, reason)
            if self._stop.is_set():
                break
            if self._connected:
                last_reason = None
            if self.down_since is None:
                self.down_since = time.monotonic()
            self.error = f"camera {self.camera}: {self.safe_url}: {reason}"
            delay = self.backoff.next_delay()
            attempt = self.reconnects + 1
            # Log when the reason changes, then at attempts 1, 2, 4, 8, ...: a camera that stays
            # down for a day does not fill the journal.
            loud = reason != last_reason or attempt & (attempt - 1) == 0
            last_reason = reason
            (log.warning if loud else log.debug)("%s; reconnect #%d in %.1f s", self.error, attempt, delay)
            self._set_state(SourceState.RECONNECTING)
            if self._stop.wait(delay):
                break
            self.reconnects += 1
            self._on_reconnect(self.reconnects)

    def _session(self) -> str:
        """One connection: decode until it ends. Returns (or raises) why it ended."""
        t0 = time.monotonic()
        try:
            container = av.open(
                self.url, options=self.options(), timeout=(self.open_timeout_s, self.read_timeout_s)
            )
        except av.FFmpegError as e:
            # An interrupted open surfaces as ExitError or, mid-handshake, as a parse error.
            if isinstance(e, av.ExitError) or time.monotonic() - t0 >= 0.9 * self.open_timeout_s:
                return f"no answer within {self.open_timeout_s:g} s (open timeout)"
            raise
        try:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            self._threading(stream)
            self.timeline.new_session()
            last_frame = time.monotonic()
            streaming = False
            bad, last_bad = 0, ""
            try:
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        return "stopped"
                    now = time.monotonic()
                    if now - last_frame > self.stall_timeout_s:
                        raise _Stalled(f"no frame for {now - last_frame:.1f} s (stall timeout)")
                    try:
                        decoded, decode_s = self._decode_packet(packet)
                        bad = 0
                    except av.FFmpegError as e:
                        bad, last_bad = bad + 1, _describe(e)
                        if bad >= _MAX_BAD_PACKETS:
                            return f"{bad} undecodable packets in a row: {last_bad}"
                        continue
                    for image, raw in decoded:
                        mono = time.monotonic()
                        if not streaming:
                            streaming = True
                            self._on_connected()
                        pts_s = self.timeline(raw, mono)
                        wall = max(time.time(), self._last_wall + _EPS)
                        self._last_wall = wall
                        if not self._deliver(image, pts_s, wall, decode_s, mono):
                            return "stopped"
                        last_frame = mono
            except av.ExitError:
                return f"no data for {self.read_timeout_s:g} s (read timeout)"
            return "end of stream (the server closed the connection)"
        finally:
            try:
                container.close()
            except (av.FFmpegError, OSError) as e:
                log.debug("camera %s: closing the stream: %s", self.camera, _describe(e))

    def _on_connected(self) -> None:
        self._connected = True
        self._set_state(SourceState.STREAMING)
        self.backoff.reset()
        if self.down_since is not None:
            log.info(
                "camera %s: streaming %s again after %.1f s (%d reconnects so far)",
                self.camera,
                self.safe_url,
                time.monotonic() - self.down_since,
                self.reconnects,
            )
        else:
            log.info("camera %s: streaming %s", self.camera, self.safe_url)
        self.down_since = None
        self.error = None


RtspSource = LiveSource
"""The live source; RTSP is the usual case."""


def open_source(
    cfg: CameraConfig,
    buffer: FrameBuffer,
    *,
    on_frame: OnFrame | None = None,
    on_state: OnState | None = None,
    on_reconnect: OnReconnect | None = None,
    on_cpu: OnCpu | None = None,
) -> VideoSource:
    """The source a camera's config asks for (not started): live for network URLs, else a file.

    Example:
        >>> from daemon.config import CameraConfig
        >>> cfg = CameraConfig(id="door", url="rtsp://u:pw@cam/1", reconnect_max_s=5)
        >>> src = open_source(cfg, FrameBuffer.for_camera(cfg))
        >>> type(src).__name__, src.safe_url, src.backoff.cap_s
        ('LiveSource', 'rtsp://***:***@cam/1', 5.0)
    """
    if cfg.is_live:
        return LiveSource(
            cfg.id,
            cfg.url,
            buffer,
            transport=cfg.rtsp_transport,
            open_timeout_s=cfg.open_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            reconnect_base_s=cfg.reconnect_base_s,
            reconnect_max_s=cfg.reconnect_max_s,
            stall_timeout_s=cfg.stall_timeout_s,
            on_frame=on_frame,
            on_state=on_state,
            on_reconnect=on_reconnect,
            on_cpu=on_cpu,
            decode_threads=cfg.decode_threads,
        )
    return FileSource(
        cfg.id, cfg.url, buffer, on_frame=on_frame, on_state=on_state, on_cpu=on_cpu, realtime=cfg.realtime,
        decode_threads=cfg.decode_threads,
    )
