"""The ``annotate`` job: run the pipeline on a file camera and write an annotated H.264 MP4.

``regionwatch annotate --config FILE --camera ID --output out.mp4`` runs exactly the pipeline of
``run`` (same detector, tracker, region logic and settings) on one file camera, every frame, and
writes each frame with the regions (translucent fill, outline, live count), every person's box,
track id and — with the SAM2 backend — mask in a stable per-track colour, and a banner on entry
and exit (see :mod:`daemon.draw`). The video has the source's frame rate, size and frame count;
it is encoded with PyAV's bundled FFmpeg (``libx264``).

The job publishes nothing: sinks, the metrics listener and the preview are off, and event
sequence numbers go to a throw-away state folder, so it can run beside a live daemon.

On a terminal a progress bar shows frames/s and the ETA; otherwise it is quiet and only the
one-line summary is printed.

Example (Python):
    >>> from daemon.annotate import ProgressBar
    >>> import io
    >>> bar = ProgressBar(total=10, stream=io.StringIO(), enabled=True)
    >>> bar.update(5); "5/10 frames" in bar.line()
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TextIO

import av
import numpy as np

from daemon.config import (
    FleetConfig,
    JsonlSinkConfig,
    MetricsConfig,
    MqttSinkConfig,
    PreviewConfig,
    Settings,
    SinksConfig,
    StateConfig,
    StdoutSinkConfig,
)
from daemon.draw import SceneAnnotator, SceneBuilder
from daemon.events import RegionTransition
from daemon.records import Frame, TrackUpdate

log = logging.getLogger(__name__)

ENCODER = "libx264"


class AnnotateError(Exception):
    """A problem that stops the job before it starts; ``code`` is the process exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a video file says about its first video stream."""

    width: int
    height: int
    rate: Fraction
    frames: int  # 0 when the container does not say

    @classmethod
    def probe(cls, path: str | os.PathLike[str]) -> VideoInfo:
        """Read size, frame rate and frame count from the file's header.

        Example:
            >>> VideoInfo.probe("../shared/assets/footage/one-by-one-person-detection.mp4")
            VideoInfo(width=768, height=432, rate=Fraction(10, 1), frames=1394)
        """
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate or Fraction(25)
            frames = int(s.frames or 0)
            if not frames and s.duration and s.time_base:
                frames = round(float(s.duration * s.time_base * rate))
            return cls(int(s.codec_context.width), int(s.codec_context.height), Fraction(rate), frames)


class ProgressBar:
    """A one-line progress bar with frames/s and ETA, redrawn in place on a terminal.

    Quiet (draws nothing) when ``stream`` is not a terminal, unless ``enabled`` says otherwise.
    """

    def __init__(self, total: int | None, *, stream: TextIO | None = None, enabled: bool | None = None,
                 label: str = "annotate", min_interval_s: float = 0.25, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total or None
        self.label = label
        self.min_interval_s = min_interval_s
        self.width = width
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = float("-inf")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        fps = self.done / elapsed
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = round(frac * self.width)
            eta = (self.total - self.done) / fps if fps > 0 else float("nan")
            eta_s = "--:--" if not np.isfinite(eta) else _clock(eta)
            return (f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {frac:4.0%} "
                    f"{self.done}/{self.total} frames  {fps:5.1f} frames/s  ETA {eta_s}")
        return f"{self.label} {self.done} frames  {fps:5.1f} frames/s  {_clock(elapsed)}"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Mp4Writer:
    """H.264 MP4 writer (PyAV, ``libx264``) fed with BGR frames, encoding on its own thread.

    ``write`` blocks when the encoder is ``queue_frames`` behind, so no frame is ever dropped.
    Frames are timed in units of ``1/rate``: a constant-rate source keeps its exact timing.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.mp4")
        >>> w = Mp4Writer(path, 64, 48, Fraction(10))
        >>> for i in range(3): w.write(np.zeros((48, 64, 3), np.uint8), i / 10)
        >>> w.close(); VideoInfo.probe(path)
        VideoInfo(width=64, height=48, rate=Fraction(10, 1), frames=3)
    """

    def __init__(self, path: str | os.PathLike[str], width: int, height: int, rate: Fraction, *,
                 crf: int = 20, preset: str = "veryfast", queue_frames: int = 8):
        if ENCODER not in av.codecs_available:
            raise AnnotateError(f"PyAV's FFmpeg (av {av.__version__}) has no {ENCODER} encoder; "
                                "install a PyAV wheel built with libx264")
        self.path = Path(path)
        self.rate = Fraction(rate)
        self.frames = 0
        self.error: BaseException | None = None
        self._container = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        stream = self._container.add_stream(ENCODER, rate=self.rate)
        stream.width, stream.height = width, height
        # 4:2:0 (what every player decodes) needs even sizes; odd-sized sources keep their size in 4:4:4.
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        stream.codec_context.time_base = 1 / self.rate
        stream.options = {"crf": str(crf), "preset": preset}
        self._stream = stream
        self._last_pts = -1
        self._queue: queue.Queue = queue.Queue(maxsize=queue_frames)
        self._thread = threading.Thread(target=self._loop, name="annotate-encoder", daemon=True)
        self._thread.start()

    def write(self, image: np.ndarray, pts_s: float) -> None:
        """Queue one BGR frame shown at stream time ``pts_s`` (raises if the encoder failed)."""
        if self.error is not None:
            raise RuntimeError(f"video encoder failed: {self.error}") from self.error
        pts = max(self._last_pts + 1, round(pts_s * self.rate))
        self._last_pts = pts
        self._queue.put((image, pts))

    def _loop(self) -> None:
        tb = 1 / self.rate
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self.error is not None:
                continue  # drain so that writers never block
            image, pts = item
            try:
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts, frame.time_base = pts, tb
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self.frames += 1
            except Exception as e:  # reported by write() and close()
                self.error = e
        if self.error is None:
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
            except Exception as e:
                self.error = e

    def close(self) -> None:
        """Flush the encoder and finish the file (raises if encoding failed)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception as e:
                self.error = self.error or e
        if self.error is not None:
            raise RuntimeError(f"video encoder failed: {self.error}") from self.error


class FrameAnnotator:
    """The pipeline observer of the job: draws every frame and hands it to the writer."""

    def __init__(self, cam_regions, writer: Mp4Writer, progress: ProgressBar, *, max_frames: int | None = None,
                 on_done=None):
        self.builder = SceneBuilder(cam_regions)
        self.annotator = SceneAnnotator(cam_regions)
        self.writer = writer
        self.progress = progress
        self.max_frames = max_frames
        self.on_done = on_done or (lambda: None)
        self.frames = 0
        self.entries = self.exits = 0
        self.error: BaseException | None = None

    def __call__(self, frame: Frame, update: TrackUpdate | None, transitions: list[RegionTransition]) -> None:
        if self.error is not None or (self.max_frames is not None and self.frames >= self.max_frames):
            return
        try:
            scene = self.builder.observe(frame, update, transitions)
            self.writer.write(self.annotator.annotate(frame.image, scene), frame.pts_s)
        except Exception as e:
            self.error = e
            self.on_done()
            return
        self.entries += sum(t.type == "entry" for t in transitions)
        self.exits += sum(t.type == "exit" for t in transitions)
        self.frames += 1
        self.progress.update()
        if self.max_frames is not None and self.frames >= self.max_frames:
            self.on_done()


@dataclass(frozen=True, slots=True)
class AnnotateResult:
    """What the job did."""

    output: Path
    frames: int
    width: int
    height: int
    rate: Fraction
    entries: int
    exits: int
    seconds: float
    exit_code: int
    interrupted: bool = False

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        rate = f"{float(self.rate):g}"
        events = f"{_count(self.entries, 'entry', 'entries')}, {_count(self.exits, 'exit', 'exits')} drawn"
        return (f"wrote {self.output}: {self.frames} frames, {self.width}x{self.height} at {rate} frames/s, "
                f"{events}; {self.seconds:.1f} s ({fps:.1f} frames/s)" + (" (interrupted)" if self.interrupted else ""))


def job_settings(settings: Settings, camera_id: str | None, state_dir: str) -> Settings:
    """The settings of an annotate run: one file camera, processed losslessly, publishing nothing."""
    cams = settings.cameras
    if camera_id is None:
        if len(cams) != 1:
            raise AnnotateError(f"the config has {len(cams)} cameras; pick one with --camera "
                                f"({', '.join(c.id for c in cams)})", 2)
        camera_id = cams[0].id
    cam = next((c for c in cams if c.id == camera_id), None)
    if cam is None:
        raise AnnotateError(f"no camera {camera_id!r} in the config (cameras: {', '.join(c.id for c in cams)})", 2)
    if cam.is_live:
        raise AnnotateError(f"camera {cam.id} is a live stream ({cam.safe_url}); annotate needs a file", 2)
    return settings.model_copy(update={
        "cameras": [cam.model_copy(update={"enabled": True, "realtime": False})],
        "sinks": SinksConfig(jsonl=JsonlSinkConfig(), stdout=StdoutSinkConfig(enabled=False),
                             mqtt=MqttSinkConfig(enabled=False)),
        "state": StateConfig(dir=state_dir),
        "metrics": MetricsConfig(enabled=False),
        "preview": PreviewConfig(enabled=False),
        "fleet": FleetConfig(),  # any camera of the config, whichever replica runs it
    })


def annotate(settings: Settings, camera_id: str | None, output: str | os.PathLike[str], *,
             max_frames: int | None = None, crf: int = 20, preset: str = "veryfast",
             progress_stream: TextIO | None = None, stop: threading.Event | None = None) -> AnnotateResult:
    """Run the job; returns its result (``exit_code`` 0 when every frame was written).

    ``stop`` (optional) interrupts it: the frames so far are kept as a valid, shorter video.
    Raises :class:`AnnotateError` for problems found before the run starts.
    """
    from daemon.app import App

    started = time.monotonic()
    output = Path(output)
    if output.suffix.lower() not in (".mp4", ".m4v"):
        raise AnnotateError(f"--output must be an .mp4 file, got {output}", 2)
    if max_frames is not None and max_frames < 1:
        raise AnnotateError(f"--max-frames must be at least 1, got {max_frames}", 2)
    with tempfile.TemporaryDirectory(prefix="regionwatch-annotate-") as state_dir:
        s = job_settings(settings, camera_id, state_dir)
        cam = s.cameras[0]
        path = cam.url.removeprefix("file://")
        try:
            info = VideoInfo.probe(path)
        except (av.FFmpegError, IndexError) as e:
            raise AnnotateError(f"cannot read video {path}: {e}") from None
        total = min(info.frames, max_frames) if max_frames is not None and info.frames else (max_frames or info.frames)
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".part")
        writer = Mp4Writer(partial, info.width, info.height, info.rate, crf=crf, preset=preset)
        progress = ProgressBar(total, stream=progress_stream, label=f"annotate {cam.id}")
        app = App(s)
        job = FrameAnnotator(cam.regions, writer, progress, max_frames=max_frames, on_done=app.request_stop)
        finished = threading.Event()
        if stop is not None:
            def forward_stop() -> None:
                while not finished.is_set():
                    if stop.wait(0.2):
                        app.request_stop()
                        return

            threading.Thread(target=forward_stop, name="annotate-stop", daemon=True).start()
        try:
            app.load()
            app.pipelines[0].observers.append(job)
            code = app.run()
        except BaseException:
            app.shutdown()
            with contextlib.suppress(Exception):
                writer.close()
            partial.unlink(missing_ok=True)
            raise
        finally:
            finished.set()
            progress.close()
        try:
            writer.close()
        except RuntimeError as e:
            job.error = job.error or e
        if job.error is not None:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"annotate failed: {job.error}") from job.error
        os.replace(partial, output)
        return AnnotateResult(output, job.frames, info.width, info.height, info.rate, job.entries, job.exits,
                              time.monotonic() - started, code, interrupted=stop is not None and stop.is_set())


def run_command(settings: Settings, args) -> int:
    """``regionwatch annotate`` (arguments parsed by :mod:`daemon.cli`): prints the summary, returns the exit code."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.warning("received %s, finishing the video so far", signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = annotate(settings, args.camera, args.output, max_frames=args.max_frames, crf=args.crf, stop=stop)
    except AnnotateError as e:
        print(f"annotate: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # model loading, encoder failure: one readable line
        log.debug("annotate failed", exc_info=True)
        print(f"annotate: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    print(result.summary())
    if result.exit_code:
        return result.exit_code
    return 130 if result.interrupted else 0
