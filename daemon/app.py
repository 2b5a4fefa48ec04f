"""The application: the only place that wires the stages together.

source → frame buffer → detector → tracker → region logic → events → sinks

Each camera gets a source thread and a pipeline thread; the detector (and the SAM2 model) are
shared between cameras. When every camera is a file, :meth:`App.run` returns once all of them
have been processed; otherwise it runs until :meth:`App.request_stop` (SIGINT/SIGTERM).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemon import __version__
from daemon.config import CameraConfig, Settings
from daemon.detector import PersonDetector
from daemon.draw import MaskMemory, encode_jpeg, render_snapshot
from daemon.events import Event, EventFactory, RegionTransition
from daemon.framebuffer import FrameBuffer
from daemon.ops.metrics import Metrics
from daemon.ops.preview import attach_preview
from daemon.ops.runtime import Ops
from daemon.preflight import preflight
from daemon.records import Frame, TrackUpdate
from daemon.refine import EntryRefiner
from daemon.regions import RegionLogic
from daemon.sinks.base import Sink
from daemon.sinks.jsonl import JsonlSink
from daemon.sinks.stdout import StdoutSink
from daemon.sources import SourceState, open_source
from daemon.state import SeqStore
from daemon.statedir import StateDir

log = logging.getLogger(__name__)

Observer = Callable[[Frame, "TrackUpdate | None", "list[RegionTransition]"], None]
"""Called by a pipeline for every processed frame: (frame, tracker update or None, transitions)."""


def build_tracker(settings: Settings, camera: CameraConfig, shared: dict):
    """A tracker for one camera, from ``[tracker]``; models are loaded once into ``shared``."""
    t = settings.tracker
    if t.backend == "bytetrack":
        from daemon.tracking.bytetrack import ByteTrackTracker

        return ByteTrackTracker(t.bytetrack, lost_after_s=t.lost_after_s, interval_s=settings.detector.interval_s)
    from daemon.tracking.sam2 import Sam2Tracker, load_sam2_model

    if "sam2" not in shared:
        shared["sam2"] = load_sam2_model(t.sam2)
    return Sam2Tracker(shared["sam2"], t.sam2, lost_after_s=t.lost_after_s, camera=camera.id)


def build_sinks(settings: Settings, metrics: Metrics, state: StateDir | None = None) -> list[Sink]:
    """Every configured sink; all of them receive the same events."""
    sinks: list[Sink] = []
    state_dir = Path(settings.state.dir)
    if settings.sinks.mqtt.enabled:
        # First: its durable outbox holds every event before any other sink shows it.
        from daemon.sinks.mqtt import MqttSink

        sinks.append(MqttSink(settings.sinks.mqtt, settings.state, metrics, settings.cameras, state_dir=state))
    if settings.sinks.stdout.enabled:
        sinks.append(StdoutSink())
    if settings.sinks.jsonl.path:
        snap_dir = state_dir / "snapshots" if settings.sinks.jsonl.snapshots else None
        sinks.append(JsonlSink(settings.sinks.jsonl.path, snapshots_dir=snap_dir, health=state and state.health))
    return sinks


class CameraPipeline:
    """Runs detector → tracker → region logic for one camera's frames, in its own thread."""

    def __init__(self, app: App, cam: CameraConfig, tracker):
        self.app, self.cam, self.tracker = app, cam, tracker
        m = app.metrics
        self.buffer = FrameBuffer.for_camera(cam, on_skip=lambda reason, n: m.frames_skipped.labels(cam.id, reason).inc(n))
        self.regions = RegionLogic(
            cam.id,
            cam.regions,
            debounce_s=app.settings.events.debounce_s,
            mask_polygon=app.settings.tracker.backend == "sam2" and app.settings.tracker.sam2.mask_polygon,
        )
        # [refine]: entries moved back to the first buffered frame with the person inside.
        self.refiner = EntryRefiner.for_camera(
            app.settings.refine, cam.id, self.buffer, self.regions.zones, app.detector,
            on_budget_exceeded=lambda: m.refine_budget_exceeded.labels(cam.id).inc(),
        )
        self.source = open_source(
            cam,
            self.buffer,
            on_frame=self._on_decoded,
            on_state=lambda state: app.stream_state_changed(cam.id, state),
            on_reconnect=lambda n: m.reconnects.labels(cam.id).inc(),
        )
        self.frames = 0
        self.last_frame: Frame | None = None
        # Observers (annotate, preview) see every processed frame; they must be quick and never draw
        # on frame.image. One that raises is logged and detached.
        self.observers: list[Observer] = []
        self._masks = MaskMemory(keep_s=app.settings.events.debounce_s + 2.0)  # entry-snapshot masks
        self._next_detection_pts = float("-inf")
        self._tracks: set[int] = set()
        self._thread = threading.Thread(target=self._run, name=f"pipeline-{cam.id}", daemon=True)
        self.done = threading.Event()

    def _on_decoded(self, frame: Frame, decode_s: float) -> None:
        self.app.metrics.frames_decoded.labels(self.cam.id).inc()
        self.app.metrics.decode_seconds.labels(self.cam.id).observe(decode_s)

    def start(self) -> None:
        self._thread.start()
        self.source.start()

    def stop(self) -> None:
        """Ask the source to stop (without waiting); the pipeline then drains and finishes."""
        self.source.stop(timeout=0)

    MAX_CONSECUTIVE_ERRORS = 25

    def _run(self) -> None:
        cam, m = self.cam.id, self.app.metrics
        errors = 0
        try:
            while not self.app.stopping.is_set():
                frame = self.buffer.get(timeout=0.5)
                if frame is None:
                    if self.buffer.closed:
                        break
                    continue
                try:
                    self._process(frame)
                    errors = 0
                except Exception:
                    # One bad frame (e.g. CUDA out of memory) must not end the camera; a pipeline that
                    # keeps failing stops the daemon (exit 1) so systemd restarts it.
                    errors += 1
                    m.frames_skipped.labels(cam, "pipeline_error").inc()
                    log.exception("camera %s: frame %d failed (%d in a row)", cam, frame.index, errors)
                    if errors >= self.MAX_CONSECUTIVE_ERRORS:
                        raise
            update = self.tracker.finish(self.last_frame)
            self._emit_all(self.refiner.process(self.regions.update(update) if update else []))
            self._emit_all(self.refiner.process(self.regions.finish()))
            self._publish_occupancy()
        except Exception:
            log.exception("camera %s: pipeline failed", cam)
            self.app.pipeline_failed(cam)
            try:  # exits for whoever was inside, so consumers' occupancy returns to zero
                self._emit_all(self.regions.finish())
                self._publish_occupancy()
            except Exception:
                log.exception("camera %s: final exit events failed", cam)
        finally:
            m.people_tracked.labels(cam).set(0)
            self.done.set()

    def _process(self, frame: Frame) -> None:
        cam, m = self.cam.id, self.app.metrics
        self.last_frame = frame
        self.frames += 1
        m.frames_processed.labels(cam).inc()
        n, nbytes = self.buffer.stats()
        m.frames_buffered.labels(cam).set(n)
        m.buffer_bytes.labels(cam).set(nbytes)

        detections = None
        if frame.pts_s + 1e-6 >= self._next_detection_pts:
            t0 = time.perf_counter()
            detections = self.app.detector(frame.image)
            elapsed = time.perf_counter() - t0
            m.detector_seconds.labels(cam).observe(elapsed)
            self.refiner.detector_ran(frame.index, elapsed)
            m.detector_runs.labels(cam).inc()
            m.detections.labels(cam).inc(len(detections))
            self._next_detection_pts = frame.pts_s + self.app.settings.detector.interval_s

        t0 = time.perf_counter()
        update = self.tracker.update(frame, detections)
        if update is None:
            self._notify(frame, None, [])
            return
        m.tracker_seconds.labels(cam).observe(time.perf_counter() - t0)
        m.people_tracked.labels(cam).set(self.tracker.active)
        new = {p.track_id for p in update.people} - self._tracks
        m.tracks_started.labels(cam).inc(len(new))
        m.tracks_ended.labels(cam).inc(len(update.ended))
        self._tracks = (self._tracks | new) - set(update.ended)
        self._masks.add(update)
        self.refiner.observe(update)
        transitions = self.refiner.process(self.regions.update(update))
        if transitions:
            self._emit_all(transitions)
            self._publish_occupancy()
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
            self.app.emit(t, self._snapshot(t))

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
            self.app.occupancy_changed(self.cam.id, region, count)


class App:
    """Builds every stage from :class:`Settings` and runs them."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stopping = threading.Event()
        self.detector: PersonDetector | None = None
        self.pipelines: list[CameraPipeline] = []
        self.sinks: list[Sink] = []
        self.failed: list[str] = []
        self._emit_locks: dict[str, threading.Lock] = {c.id: threading.Lock() for c in settings.cameras}
        self._occupancy: dict[tuple[str, str], int] = {}
        self._events: EventFactory | None = None
        self._seq: SeqStore | None = None
        self.state: StateDir | None = None  # the locked, checked state folder (from load)
        self.ops = Ops(settings.metrics, self.metrics)  # /metrics, /healthz, /readyz, sd_notify
        self.preview = None  # daemon.ops.preview.Preview once loaded, when [preview] enabled

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load models and build every stage (slow: model loading). Raises on bad models."""
        s = self.settings
        d = s.detector
        # I/O preconditions and the state folder's lock and integrity, before any model loads:
        # raises PreflightError (section.key problems).
        self.state = preflight(s, self.metrics)
        self.ops.health.add_check(self.state.health.problems)  # not ready while the state disk fails
        self.ops.start(lambda: {p.cam.id: p.source.state for p in self.pipelines})
        self.detector = PersonDetector(
            d.model, confidence=d.confidence, iou=d.iou, imgsz=d.imgsz, device=d.device,
            min_box_area_px=d.min_box_area_px,
        )
        shared: dict = {}
        cams = [c for c in s.cameras if c.enabled]
        trackers = [build_tracker(s, c, shared) for c in cams]
        self._seq = SeqStore(s.state.dir, synchronous=s.state.fsync, health=self.state.health,
                             floor=self.state.seq_floor)
        self._events = EventFactory(self._seq)
        self.sinks = build_sinks(s, self.metrics, self.state)
        self.pipelines = [CameraPipeline(self, c, t) for c, t in zip(cams, trackers)]
        self.preview = attach_preview(s.preview, self.ops.server, self.pipelines)  # [preview], off by default
        self.metrics.build.info(
            {
                "version": __version__,
                "backend": s.tracker.backend,
                "detector_model": self.detector.model_name,
                "sam2_model": Path(s.tracker.sam2.model_config_name).stem if s.tracker.backend == "sam2" else "",
            }
        )
        for c in cams:
            for r in c.regions:
                self.metrics.occupancy.labels(c.id, r.id).set(0)
        self.ops.init_series(cams, [k.name for k in self.sinks])
        self.ops.loaded(f"models loaded ({self.detector.model_name}, {s.tracker.backend})")

    def start(self) -> None:
        for p in self.pipelines:
            p.start()

    @property
    def all_files(self) -> bool:
        return all(not p.cam.is_live for p in self.pipelines)

    def run(self) -> int:
        """Load, start and run until done (files) or stopped (signal). Returns an exit code."""
        if self.detector is None:
            self.load()
        self.start()
        try:
            while not self.stopping.is_set():
                self.ops.tick()  # heartbeat, WATCHDOG=1, STATUS=
                for p in self.pipelines:
                    self.metrics.stream_fps.labels(p.cam.id).set(p.source.fps)
                if self.all_files and all(p.done.is_set() for p in self.pipelines):
                    self.ops.finished()
                    break
                if self.failed:  # a live pipeline gave up: exit 1 so the supervisor restarts us
                    break
                self.stopping.wait(0.5)
        finally:
            self.shutdown()
        file_errors = [p.cam.id for p in self.pipelines if not p.cam.is_live and p.source.error]
        return 1 if self.failed or file_errors else 0

    def request_stop(self) -> None:
        """Ask every stage to stop; :meth:`run` then flushes sinks and returns."""
        self.stopping.set()

    def shutdown(self, timeout_s: float = 20.0) -> None:
        """Stop every camera at once, wait for their last events, then flush and close the sinks."""
        self.ops.begin_stop()
        self.stopping.set()
        for p in self.pipelines:
            p.stop()
        deadline = time.monotonic() + timeout_s
        for p in self.pipelines:
            if not p.done.wait(max(0.0, deadline - time.monotonic())):
                log.error("camera %s: pipeline did not finish within %.0f s of the stop", p.cam.id, timeout_s)
                self.failed.append(p.cam.id)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("sink %s: close failed", sink.name)
        if self._seq:
            self._seq.close()
        if self.state:
            self.state.close()
        self.ops.close()

    # -- callbacks from pipelines ---------------------------------------------------------
    def emit(self, t: RegionTransition, snapshot: bytes | None) -> Event:
        with self._emit_locks[t.camera]:  # events stay in seq order per camera
            event = self._events.make(t)
            self.metrics.events.labels(t.camera, t.region, t.type).inc()
            for sink in self.sinks:
                try:
                    sink.publish(event, snapshot)
                    self.metrics.sink_publish.labels(sink.name, "ok").inc()
                except Exception:
                    self.metrics.sink_publish.labels(sink.name, "error").inc()
                    log.exception("sink %s: publish failed for event %s", sink.name, event.id)
        return event

    def occupancy_changed(self, camera: str, region: str, count: int) -> None:
        with self._emit_locks[camera]:
            if self._occupancy.get((camera, region)) == count:
                return
            self._occupancy[(camera, region)] = count
            self.metrics.occupancy.labels(camera, region).set(count)
            for sink in self.sinks:
                sink.occupancy(camera, region, count)

    def stream_state_changed(self, camera: str, state) -> None:
        name = getattr(state, "value", str(state))
        for s in SourceState:
            self.metrics.stream_state.labels(camera, s.value).set(1 if s.value == name else 0)
        self.metrics.stream_up.labels(camera).set(1 if name == "streaming" else 0)
        for sink in self.sinks:
            sink.stream_state(camera, name == "streaming")

    def pipeline_failed(self, camera: str) -> None:
        self.failed.append(camera)
