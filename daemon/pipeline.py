"""One camera's per-frame path: frame buffer → detector → tracker → identity → region logic.

:class:`CameraPipeline` runs in its own thread and talks to the application only through a
:class:`PipelineOutput` (events, occupancy, stream state, failure) — it never reaches back into
the app. Stages are given to it, built by :mod:`daemon.app` (the one wiring module).

The detector does not run on every frame: :class:`DetectorSchedule` runs it every
``detector.interval_s`` of stream time to find new entrants, every ``tracking_interval_s`` while
anyone is tracked, and on the next frame whenever the tracker asks (a person it lost sight of, a
new track waiting for confirmation). Between runs the tracker follows people on every frame.
While nobody is tracked, frames without motion (:class:`daemon.motion.MotionDetector`) skip the
detector, except once every ``idle_check_s`` (someone standing still since before the start).

Each stage's CPU time is counted per camera (``regionwatch_stage_cpu_seconds_total``): decode and
jpeg on the source and buffer threads, detect (the runtime's threads included), track and regions
here.

Example: the schedule on a 10 fps stream, nobody tracked, then someone tracked.
    >>> s = DetectorSchedule(interval_s=0.5, tracking_interval_s=0.2)
    >>> [i for i in range(12) if s.due(i / 10, tracking=False, wants=False)]
    [0, 5, 10]
    >>> s = DetectorSchedule(interval_s=0.5, tracking_interval_s=0.2)
    >>> [i for i in range(12) if s.due(i / 10, tracking=True, wants=i == 3)]
    [0, 2, 3, 5, 7, 9, 11]
    >>> s = DetectorSchedule(interval_s=0.5, tracking_interval_s=0.2, idle_check_s=1.0)
    >>> [i for i in range(25) if s.due(i / 10, tracking=False, wants=False, moving=i in (3, 4, 17))]
    [0, 10, 17]
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from daemon.config import CameraConfig, Settings
from daemon.draw import MaskMemory, encode_jpeg, render_snapshot
from daemon.events import RegionTransition
from daemon.framebuffer import FrameBuffer
from daemon.geometry import polygon_meets_frame
from daemon.motion import MotionDetector
from daemon.ops.cpu import StageCpu
from daemon.ops.metrics import CameraMetrics
from daemon.records import Detections, Frame, TrackUpdate
from daemon.refine import EntryRefiner
from daemon.regions import RegionLogic
from daemon.sources import open_source
from daemon.tracking.base import Tracker
from daemon.tracking.identity import IdentityKeeper

log = logging.getLogger(__name__)

Observer = Callable[[Frame, "TrackUpdate | None", "list[RegionTransition]"], None]
"""Called by a pipeline for every processed frame: (frame, tracker update or None, transitions)."""


class PipelineOutput(Protocol):
    """What a camera pipeline reports to the application (implemented by :class:`daemon.app.App`)."""

    def emit(self, t: RegionTransition, snapshot: bytes | None) -> object: ...

    def occupancy_changed(self, camera: str, region: str, count: int) -> None: ...

    def stream_state_changed(self, camera: str, state, pipeline: CameraPipeline | None = None) -> None: ...

    def people_in_view(self, camera: str, count: int) -> None: ...

    def detection_paused(self, camera: str) -> bool: ...

    def pipeline_failed(self, camera: str) -> None: ...


class DetectorSchedule:
    """Decides on which frames of one camera the detector runs (module doc)."""

    def __init__(self, interval_s: float, tracking_interval_s: float, idle_check_s: float | None = None):
        self.interval_s = interval_s
        self.tracking_interval_s = min(tracking_interval_s, interval_s)
        self.idle_check_s = idle_check_s  # None: no motion gate
        self._last = float("-inf")

    def reset(self) -> None:
        """Run on the next frame (detection switched back on)."""
        self._last = float("-inf")

    def due(self, pts_s: float, *, tracking: bool, wants: bool, moving: bool = True) -> bool:
        """Whether to run now (``moving``: the frame shows motion); a True answer counts as a run."""
        period = self.tracking_interval_s if tracking else self.interval_s
        if not (tracking or moving or self.idle_check_s is None):
            period = max(period, self.idle_check_s)  # a still, empty scene: look now and then
        if wants or pts_s + 1e-6 >= self._last + period:
            self._last = pts_s
            return True
        return False


class CameraPipeline:
    """Runs detector → tracker → identity → region logic for one camera's frames, in its own thread."""

    MAX_CONSECUTIVE_ERRORS = 25

    def __init__(
        self,
        cam: CameraConfig,
        settings: Settings,
        *,
        detector: Callable[[object], Detections],
        tracker: Tracker,
        output: PipelineOutput,
        metrics: CameraMetrics,
        stopping: threading.Event,
        first_track_id: int = 1,
    ):
        self.cam, self.tracker, self.output, self.metrics = cam, tracker, output, metrics
        self.detector = detector
        self.stopping = stopping
        m = metrics
        # Recent frames stay decoded (JPEG only when read): long enough for an entry's snapshot.
        recent_s = max(2.0, settings.events.debounce_s + settings.detector.interval_s + 1.0)
        self.buffer = FrameBuffer.for_camera(cam, on_skip=m.skipped, on_cpu=m.cpu["jpeg"].inc, recent_s=recent_s)
        self.regions = RegionLogic(
            cam.id,
            cam.regions,
            debounce_s=settings.events.debounce_s,
            mask_polygon=settings.tracker.backend == "sam2" and settings.tracker.sam2.mask_polygon,
        )
        # One identity per person through occlusions and crossings, whatever the tracker.
        self.identity = IdentityKeeper(settings.tracker.lost_after_s, first_id=first_track_id)
        d = settings.detector
        self.schedule = DetectorSchedule(d.interval_s, d.tracking_interval_s, d.idle_check_s if d.motion_gate else None)
        self.motion = MotionDetector() if d.motion_gate else None
        self._track_cpu = StageCpu(m.cpu["track"].inc)
        self._regions_cpu = StageCpu(m.cpu["regions"].inc)
        # [refine]: entries moved back to the first buffered frame with the person inside.
        self.refiner = EntryRefiner.for_camera(
            settings.refine, cam.id, self.buffer, self.regions.zones, detector,
            on_budget_exceeded=m.refine_budget_exceeded.inc,
        )
        self.source = open_source(
            cam,
            self.buffer,
            on_frame=self._on_decoded,
            on_state=lambda state: output.stream_state_changed(cam.id, state, self),
            on_reconnect=lambda n: m.reconnects.inc(),
            on_cpu=m.cpu["decode"].inc,
        )
        self.frames = 0
        self.detector_runs = 0
        self.last_frame: Frame | None = None
        # Observers (annotate, preview, evaluate) see every processed frame; they must be quick and
        # never draw on frame.image. One that raises is logged and detached.
        self.observers: list[Observer] = []
        self._masks = MaskMemory(keep_s=settings.events.debounce_s + 2.0)  # entry-snapshot masks
        self._tracks: set[int] = set()
        self._paused = False  # detection switched off (see _pause)
        self._sizes: set[tuple[int, int]] = set()  # frame sizes the regions were checked against
        self._thread = threading.Thread(target=self._run, name=f"pipeline-{cam.id}", daemon=True)
        self.done = threading.Event()

    def _on_decoded(self, frame: Frame, decode_s: float) -> None:
        self.metrics.frames_decoded.inc()
        self.metrics.decode_seconds.observe(decode_s)

    def start(self) -> None:
        self._thread.start()
        self.source.start()

    def stop(self) -> None:
        """Ask the source to stop (without waiting); the pipeline then drains and finishes."""
        self.source.stop(timeout=0)

    def _run(self) -> None:
        cam, m = self.cam.id, self.metrics
        errors = 0
        try:
            while not self.stopping.is_set():
                frame = self.buffer.get(timeout=0.5)
                if frame is None:
                    if self.buffer.closed:
                        break
                    continue
                try:
                    self.process(frame)
                    errors = 0
                except Exception:
                    # One bad frame (e.g. CUDA out of memory) must not end the camera; a pipeline that
                    # keeps failing stops the daemon (exit 1) so systemd restarts it.
                    errors += 1
                    m.skipped("pipeline_error")
                    log.exception("camera %s: frame %d failed (%d in a row)", cam, frame.index, errors)
                    if errors >= self.MAX_CONSECUTIVE_ERRORS:
                        raise
            self.finish()
        except Exception:
            log.exception("camera %s: pipeline failed", cam)
            self.output.pipeline_failed(cam)
            try:  # exits for whoever was inside, so consumers' occupancy returns to zero
                self._emit_all(self.regions.finish())
                self._publish_occupancy()
            except Exception:
                log.exception("camera %s: final exit events failed", cam)
        finally:
            m.people_tracked.set(0)
            self.done.set()

    def process(self, frame: Frame) -> None:
        """Everything one frame goes through (called on the pipeline thread, or directly by tests)."""
        m = self.metrics
        self.last_frame = frame
        self.frames += 1
        if frame.size not in self._sizes:  # the first frame, or a reconnect at another resolution
            self._check_regions(frame.size)
        m.frames_processed.inc()
        n, nbytes = self.buffer.stats()
        m.frames_buffered.set(n)
        m.buffer_bytes.set(nbytes)
        if self.output.detection_paused(self.cam.id):  # the camera's detection switch is off
            return self._pause(frame)
        self._paused = False

        detections = None
        tracking = self.identity.active > 0 or self.tracker.active > 0
        moving = True
        if self.motion is not None:
            if tracking:
                self.motion.reset()  # stale while people are followed: start afresh when they are gone
            else:
                with self._regions_cpu:  # cheap (~0.3 ms); counted with the region logic
                    moving = self.motion(frame.image).moving
        if self.schedule.due(frame.pts_s, tracking=tracking, wants=self.tracker.wants_detection,
                             moving=moving):
            t0 = time.perf_counter()
            detections = self.detector(frame.image)
            elapsed = time.perf_counter() - t0
            m.cpu["detect"].inc(getattr(self.detector, "last_cpu_s", 0.0))
            m.detector_seconds.observe(elapsed)
            self.refiner.detector_ran(frame.index, elapsed)
            m.detector_runs.inc()
            self.detector_runs += 1
            m.detections.inc(len(detections))

        t0 = time.perf_counter()
        with self._track_cpu:
            update = self.tracker.update(frame, detections)
            if update is not None:
                update = self.identity.update(update)
        if update is None:
            self._notify(frame, None, [])
            return
        m.tracker_seconds.observe(time.perf_counter() - t0)
        self._step(frame, update)

    def _check_regions(self, size: tuple[int, int]) -> None:
        """A WARNING for each region that lies entirely outside frames of ``size`` (once per size)."""
        self._sizes.add(size)
        for r in self.cam.regions:
            if not polygon_meets_frame(r.polygon, size):
                xs, ys = [x for x, _ in r.polygon], [y for _, y in r.polygon]
                log.warning("camera %s: region %s lies entirely outside the %dx%d frame (polygon x %g..%g, y %g..%g); "
                            "nobody can ever be inside it (is the polygon drawn for another resolution?)",
                            self.cam.id, r.id, size[0], size[1], min(xs), max(xs), min(ys), max(ys))

    def finish(self, frame: Frame | None = None) -> None:
        """End of stream (or detection paused): end every track, exits at their last sighting."""
        frame = frame or self.last_frame
        ended = self.tracker.finish(frame)
        if ended is None and frame is not None:  # nobody left in the tracker; the missing end here
            ended = TrackUpdate(frame, ())
        update = self.identity.finish(ended)
        if update is not None:
            self._step(update.frame, update, notify=False)
        self._emit_all(self.refiner.process(self.regions.finish()))
        self._publish_occupancy()
        self.output.people_in_view(self.cam.id, 0)

    def _pause(self, frame: Frame) -> None:
        """Detection is switched off: end every track once (exits, occupancy and people 0), then
        only pass frames on to the observers (preview) until it is switched on again."""
        if not self._paused:
            self._paused = True
            self.finish(frame)
            self.metrics.people_tracked.set(0)
            self._tracks.clear()
            self.schedule.reset()  # detect at once when switched on again
        self._notify(frame, None, [])

    def _step(self, frame: Frame, update: TrackUpdate, *, notify: bool = True) -> None:
        m = self.metrics
        m.people_tracked.set(self.identity.active)
        new = {p.track_id for p in update.people} - self._tracks
        m.tracks_started.inc(len(new))
        m.tracks_ended.inc(len(update.ended))
        self._tracks = (self._tracks | new) - set(update.ended)
        self._masks.add(update)
        with self._regions_cpu:
            self.refiner.observe(update)
            transitions = self.refiner.process(self.regions.update(update))
        if transitions:
            self._emit_all(transitions)
            self._publish_occupancy()
        # Confirmed people only: a new track the detector has not seen twice is not yet someone.
        self.output.people_in_view(self.cam.id, sum(p.confirmed for p in update.people))
        if notify:
            self._notify(frame, update, transitions)

    def _notify(self, frame: Frame, update: TrackUpdate | None, transitions: list[RegionTransition]) -> None:
        for observer in list(self.observers):
            try:
                observer(frame, update, transitions)
            except Exception:
                log.exception("camera %s: frame observer %r failed; detached", self.cam.id, observer)
                self.observers.remove(observer)

    def _emit_all(self, transitions: list[RegionTransition]) -> None:
        for t in transitions:
            self.output.emit(t, self._snapshot(t))

    def _snapshot(self, t: RegionTransition) -> bytes | None:
        if t.type != "entry":
            return None
        frame = self.buffer.find(t.frame)
        if frame is None and self.buffer.flush(1.0):  # the JPEG encoder thread may lag a little
            frame = self.buffer.find(t.frame)
        if frame is None:
            return None
        try:  # the entry frame with that person's box (and mask) drawn
            image = render_snapshot(frame.decode(), t, self.cam.regions, mask=self._masks.get(t.frame, t.track_id))
            return encode_jpeg(image, self.cam.jpeg_quality)
        except Exception:
            log.exception("camera %s: drawing the entry snapshot failed; sending the plain frame", self.cam.id)
            return frame.jpeg

    def _publish_occupancy(self) -> None:
        for region, count in self.regions.occupancy().items():
            self.output.occupancy_changed(self.cam.id, region, count)
