"""The application: the only place that wires the stages together.

source → frame buffer → detector → tracker → region logic → events → sinks

Each camera gets a source thread and a pipeline thread (:class:`daemon.pipeline.CameraPipeline`);
the detector (and the SAM2 model) are shared between cameras. When every camera is a file, :meth:`App.run` returns once all of them
have been processed; otherwise it runs until :meth:`App.request_stop` (SIGINT/SIGTERM).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from daemon import __version__
from daemon.config import CameraConfig, Settings
from daemon.detector import PersonDetector
from daemon.events import Event, EventFactory, RegionTransition
from daemon.fleet import FleetPlan, Shard
from daemon.ops.links import public_base_url
from daemon.ops.metrics import Metrics
from daemon.ops.preview import attach_preview
from daemon.ops.runtime import Ops
from daemon.pipeline import CameraPipeline
from daemon.preflight import preflight
from daemon.sinks.base import Sink
from daemon.sinks.jsonl import JsonlSink
from daemon.sinks.stdout import StdoutSink
from daemon.snapshots import SnapshotStore
from daemon.sources import SourceState
from daemon.state import SeqStore
from daemon.statedir import StateDir
from daemon.switches import DetectionSwitches

log = logging.getLogger(__name__)


def build_tracker(settings: Settings, camera: CameraConfig, shared: dict, metrics: Metrics | None = None):
    """A tracker for one camera, from ``[tracker]``; models (and the SAM2 server) are built once into ``shared``."""
    t = settings.tracker
    if t.backend == "bytetrack":
        from daemon.tracking.bytetrack import ByteTrackTracker

        return ByteTrackTracker(t.bytetrack)
    from daemon.tracking.sam2 import build_sam2_tracker

    return build_sam2_tracker(settings, camera, shared, metrics=metrics)


def build_sinks(settings: Settings, metrics: Metrics, shard: Shard | None = None, *, device=None, on_detection=None,
                elsewhere: tuple[str, ...] = (), state: StateDir | None = None) -> list[Sink]:
    """Every configured sink; all of them receive the same events.

    ``shard`` and ``elsewhere`` (cameras other replicas run): see daemon/fleet.py. ``device`` (a
    :class:`daemon.sinks.mqtt.DeviceInfo`) describes the cameras to Home Assistant;
    ``on_detection(camera, enabled)`` is called for detection switch commands (MQTT). ``state``:
    the daemon's locked state directory (daemon/statedir.py).
    """
    sinks: list[Sink] = []
    state_dir = Path(settings.state.dir)
    if settings.sinks.mqtt.enabled:
        # First: its durable outbox holds every event before any other sink shows it.
        from daemon.sinks.mqtt import MqttSink

        sinks.append(MqttSink(settings.sinks.mqtt, settings.state, metrics, settings.cameras, device=device,
                              on_detection=on_detection, shard=shard, elsewhere=elsewhere, state_dir=state))
    if settings.sinks.stdout.enabled:
        sinks.append(StdoutSink())
    if settings.sinks.jsonl.path:
        snap_dir = state_dir / "snapshots" if settings.sinks.jsonl.snapshots else None
        sinks.append(JsonlSink(settings.sinks.jsonl.path, snapshots_dir=snap_dir, health=state and state.health))
    return sinks


class App:
    """Builds every stage from :class:`Settings` and runs them; the pipelines' :class:`~daemon.pipeline.PipelineOutput`."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None):
        # [fleet] shard: from here on, settings are this replica's (its cameras, its state dir)
        self.fleet = FleetPlan.of(settings)
        self.settings = settings = self.fleet.settings
        self.metrics = metrics or Metrics()
        self.stopping = threading.Event()
        self.detector: PersonDetector | None = None
        self.pipelines: list[CameraPipeline] = []
        self.sinks: list[Sink] = []
        self.failed: list[str] = []
        self._emit_locks: dict[str, threading.Lock] = {c.id: threading.Lock() for c in settings.cameras}
        self._occupancy: dict[tuple[str, str], int] = {}
        self._people: dict[str, int] = {}
        self.switches: DetectionSwitches | None = None  # per-camera detection on/off (MQTT switch)
        self.snapshots: SnapshotStore | None = None  # entry snapshots by event id (HTTP)
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
        self.detector = PersonDetector.from_config(d)
        shared: dict = {}
        cams = [c for c in s.cameras if c.enabled]
        trackers = [build_tracker(s, c, shared, self.metrics) for c in cams]
        self._seq = SeqStore(s.state.dir, synchronous=s.state.fsync, health=self.state.health,
                             floor=self.state.seq_floor)
        self.fleet.release(self._seq)  # cameras now run by other shards: numbering restarts there
        self._events = EventFactory(self._seq)
        self.switches = DetectionSwitches(s.state.dir, [c.id for c in cams])
        base_url = public_base_url(s.metrics, self.ops.server)
        self.snapshots = SnapshotStore(
            Path(s.state.dir) / "event-snapshots", keep_days=s.snapshots.keep_days, keep_mb=s.snapshots.keep_mb,
            base_url=base_url if s.snapshots.keep and self.ops.server is not None else None,
        )
        if self.snapshots.keeping:
            self.snapshots.mount(self.ops.server)  # /events/{id}/snapshot.jpg
        self.sinks = build_sinks(s, self.metrics, self.fleet.shard, device=self._device_info(base_url),
                                 on_detection=self.set_detection, elsewhere=self.fleet.others, state=self.state)
        for c in cams:
            for sink in self.sinks:
                sink.detection_state(c.id, self.switches.enabled(c.id))
        self.pipelines = [
            CameraPipeline(c, s, detector=self.detector, tracker=t, output=self, metrics=self.metrics.camera(c.id),
                           stopping=self.stopping)
            for c, t in zip(cams, trackers)
        ]
        self.preview = attach_preview(s.preview, self.ops.server, self.pipelines)  # [preview], off by default
        self.metrics.build.info(
            {
                "version": __version__,
                "backend": s.tracker.backend,
                "detector_model": self.detector.model_name,
                "sam2_model": Path(s.tracker.sam2.model_config_name).stem if s.tracker.backend == "sam2" else "",
            }
        )
        self.fleet.export(self.metrics)
        for c in cams:
            for r in c.regions:
                self.metrics.occupancy.labels(c.id, r.id).set(0)
        self.ops.init_series(cams, [k.name for k in self.sinks])
        self.ops.loaded(f"models loaded ({self.detector.model_name}, {s.tracker.backend})")

    def _device_info(self, base_url: str | None):
        """What Home Assistant shows about each camera's device (the preview page, when on)."""
        from daemon.sinks.mqtt.discovery import DeviceInfo

        s = self.settings
        return DeviceInfo(
            sw_version=__version__,
            model=f"{self.detector.model_name} + {s.tracker.backend}",
            configuration_url=f"{base_url}/" if s.preview.enabled and base_url else None,
        )

    def start(self) -> None:
        for p in self.pipelines:
            p.start()

    @property
    def all_files(self) -> bool:
        # Over the whole fleet's cameras: a replica with no camera of its own idles with live ones.
        return self.fleet.all_files

    def run(self) -> int:
        """Load, start and run until done (files) or stopped (signal). Returns an exit code."""
        if self.detector is None:
            self.load()
        self.start()
        try:
            while not self.stopping.is_set():
                self.ops.tick()  # heartbeat, WATCHDOG=1, STATUS=
                for p in self.pipelines:
                    p.metrics.stream_fps.set(p.source.fps)
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
            event, snapshot = self.snapshots.attach(event, snapshot)  # names the event, kept by id
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

    def people_in_view(self, camera: str, count: int) -> None:
        """People the tracker sees on the camera now (only changes reach the sinks)."""
        if self._people.get(camera) == count:
            return
        self._people[camera] = count
        for sink in self.sinks:
            sink.people(camera, count)

    def detection_paused(self, camera: str) -> bool:
        return not self.switches.enabled(camera)

    def set_detection(self, camera: str, enabled: bool) -> None:
        """Switch detection on or off for a camera (an MQTT command); kept across restarts."""
        try:
            changed = self.switches.set(camera, enabled)
        except KeyError:
            log.warning("detection switch for unknown camera %r ignored", camera)
            return
        except OSError as e:  # still switched, only not remembered
            log.warning("camera %s: cannot save the detection switch: %s", camera, e)
            changed = True
        if changed:
            log.info("camera %s: detection switched %s", camera, "on" if enabled else "off")
        for sink in self.sinks:
            sink.detection_state(camera, enabled)

    def pipeline_failed(self, camera: str) -> None:
        self.failed.append(camera)
