"""The application: the only place that wires the stages together.

source → frame buffer → detector → tracker → region logic → events → sinks

Each camera gets a source thread and a pipeline thread (:class:`daemon.pipeline.CameraPipeline`);
the detector (and the SAM2 model) are shared between cameras. When every camera is a file, :meth:`App.run` returns once all of them
have been processed; otherwise it runs until :meth:`App.request_stop` (SIGINT/SIGTERM).

:meth:`App.reload` applies a new configuration while running (SIGHUP): it restarts only what
changed (see :mod:`daemon.reconfig`) and loses no event on the way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection
from pathlib import Path

from daemon import __version__
from daemon.config import CameraConfig, ConfigError, DetectorConfig, Settings
from daemon.detector import ModelLoadError, PersonDetector, ReplaceableDetector
from daemon.events import Event, EventFactory, RegionTransition
from daemon.fleet import FleetPlan, Shard
from daemon.ops.links import public_base_url
from daemon.ops.metrics import Metrics
from daemon.ops.preview import attach_preview
from daemon.ops.runtime import Ops
from daemon.pipeline import CameraPipeline
from daemon.preflight import preflight, sink_problems
from daemon.reconfig import SINK_ORDER, ReloadPlan, keep_restart_only, plan_reload
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
                elsewhere: tuple[str, ...] = (), state: StateDir | None = None,
                only: Collection[str] = SINK_ORDER, start: bool = True) -> list[Sink]:
    """Every configured sink (of those named in ``only``); all of them receive the same events.

    ``shard`` and ``elsewhere`` (cameras other replicas run): see daemon/fleet.py. ``device`` (a
    :class:`daemon.sinks.mqtt.DeviceInfo`) describes the cameras to Home Assistant;
    ``on_detection(camera, enabled)`` is called for detection switch commands (MQTT). ``state``:
    the daemon's locked state directory (daemon/statedir.py). ``start=False``: the MQTT sink does
    not connect before :meth:`~daemon.sinks.base.Sink.start`.
    """
    sinks: list[Sink] = []
    state_dir = Path(settings.state.dir)
    try:
        if settings.sinks.mqtt.enabled and "mqtt" in only:
            # First: its durable outbox holds every event before any other sink shows it.
            from daemon.sinks.mqtt import MqttSink

            sinks.append(MqttSink(settings.sinks.mqtt, settings.state, metrics, settings.cameras, device=device,
                                  on_detection=on_detection, shard=shard, elsewhere=elsewhere, state_dir=state,
                                  start=start))
        if settings.sinks.stdout.enabled and "stdout" in only:
            sinks.append(StdoutSink())
        if settings.sinks.jsonl.path and "jsonl" in only:
            snap_dir = state_dir / "snapshots" if settings.sinks.jsonl.snapshots else None
            sinks.append(JsonlSink(settings.sinks.jsonl.path, snapshots_dir=snap_dir, health=state and state.health))
    except BaseException:
        for sink in sinks:  # the ones built so far (an open outbox) are not left behind
            sink.close()
        raise
    return sinks


class App:
    """Builds every stage from :class:`Settings` and runs them; the pipelines' :class:`~daemon.pipeline.PipelineOutput`."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None):
        self.configured = settings  # the whole configuration, every shard's cameras (reload compares it)
        # [fleet] shard: from here on, settings are this replica's (its cameras, its state dir)
        self.fleet = FleetPlan.of(settings)
        self.settings = settings = self.fleet.settings
        self.metrics = metrics or Metrics()
        self.stopping = threading.Event()
        self.detector: ReplaceableDetector | None = None  # shared by every camera; a reload may swap it
        self.pipelines: list[CameraPipeline] = []
        self.sinks: list[Sink] = []
        self.failed: list[str] = []
        self._emit_locks: dict[str, threading.Lock] = {c.id: threading.Lock() for c in settings.cameras}
        self._sinks_lock = threading.Lock()  # stream, people and switch updates against a sink rebuild
        # Held while loading, reloading and shutting down: one of them at a time.
        self._reconfigure = threading.Lock()
        self._started = threading.Event()  # cameras started: a reload may apply from now on
        self._shared: dict = {}  # models built once for every camera (the SAM2 server)
        self._running: set[str] = set()  # cameras whose pipeline is the current one (their states reach sinks)
        self._base_url: str | None = None
        self._occupancy: dict[tuple[str, str], int] = {}
        self._people: dict[str, int] = {}
        self._next_track: dict[str, int] = {}  # per camera, after a reload restarted it
        self._streams: dict[str, bool] = {}
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
        with self._reconfigure:  # a SIGHUP while models load is applied once they are
            self._load()

    def _load(self) -> None:
        s = self.settings
        # I/O preconditions and the state folder's lock and integrity, before any model loads:
        # raises PreflightError (section.key problems).
        self.state = preflight(s, self.metrics)
        self.ops.health.add_check(self.state.health.problems)  # not ready while the state disk fails
        self.ops.start(lambda: {p.cam.id: p.source.state for p in self.pipelines})
        self.detector = ReplaceableDetector(self._make_detector(s.detector))
        cams = [c for c in s.cameras if c.enabled]
        trackers = [build_tracker(s, c, self._shared, self.metrics) for c in cams]
        self._seq = SeqStore(s.state.dir, synchronous=s.state.fsync, health=self.state.health,
                             floor=self.state.seq_floor)
        self.fleet.release(self._seq)  # cameras now run by other shards: numbering restarts there
        self._events = EventFactory(self._seq)
        self.switches = DetectionSwitches(s.state.dir, [c.id for c in cams])
        self._base_url = base_url = public_base_url(s.metrics, self.ops.server)
        self.snapshots = SnapshotStore(
            Path(s.state.dir) / "event-snapshots", keep_days=s.snapshots.keep_days, keep_mb=s.snapshots.keep_mb,
            base_url=base_url if s.snapshots.keep and self.ops.server is not None else None,
        )
        if self.snapshots.keeping:
            self.snapshots.mount(self.ops.server)  # /events/{id}/snapshot.jpg
        self.sinks = self._build_sinks(s)
        for c in cams:
            for sink in self.sinks:
                sink.detection_state(c.id, self.switches.enabled(c.id))
        self.pipelines = [self._pipeline(c, t) for c, t in zip(cams, trackers)]
        self._running = {c.id for c in cams}
        self.preview = attach_preview(s.preview, self.ops.server, self.pipelines)  # [preview], off by default
        self._export_build()
        self.fleet.export(self.metrics)
        for c in cams:
            for r in c.regions:
                self.metrics.occupancy.labels(c.id, r.id).set(0)
        self.ops.init_series(cams, [k.name for k in self.sinks])
        self.ops.loaded(f"models loaded ({self.detector.model_name}, {s.tracker.backend})")

    @staticmethod
    def _make_detector(d: DetectorConfig) -> PersonDetector:
        return PersonDetector.from_config(d)

    def _pipeline(self, cam: CameraConfig, tracker) -> CameraPipeline:
        self._emit_locks.setdefault(cam.id, threading.Lock())
        return CameraPipeline(cam, self.settings, detector=self.detector, tracker=tracker, output=self,
                              metrics=self.metrics.camera(cam.id), stopping=self.stopping,
                              first_track_id=self._next_track.get(cam.id, 1))

    def _build_sinks(self, s: Settings, only: Collection[str] = SINK_ORDER, *, start: bool = True) -> list[Sink]:
        return build_sinks(s, self.metrics, self.fleet.shard, device=self._device_info(self._base_url),
                           on_detection=self.set_detection, elsewhere=self.fleet.others, state=self.state,
                           only=only, start=start)

    def _export_build(self) -> None:
        s = self.settings
        self.metrics.build.info(
            {
                "version": __version__,
                "backend": s.tracker.backend,
                "detector_model": self.detector.model_name,
                "sam2_model": Path(s.tracker.sam2.model_config_name).stem if s.tracker.backend == "sam2" else "",
            }
        )

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
        with self._reconfigure:
            for p in self.pipelines:
                p.start()
            self._started.set()

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
                if self.all_files and self._all_done():
                    self.ops.finished()
                    break
                if self.failed:  # a live pipeline gave up: exit 1 so the supervisor restarts us
                    break
                self.stopping.wait(0.5)
        finally:
            self.shutdown()
        file_errors = [p.cam.id for p in self.pipelines if not p.cam.is_live and p.source.error]
        return 1 if self.failed or file_errors else 0

    def _all_done(self) -> bool:
        """Every camera finished (never while a reload swaps cameras)."""
        if not self._reconfigure.acquire(blocking=False):
            return False
        try:
            return all(p.done.is_set() for p in self.pipelines)
        finally:
            self._reconfigure.release()

    def request_stop(self) -> None:
        """Ask every stage to stop; :meth:`run` then flushes sinks and returns."""
        self.stopping.set()

    def shutdown(self, timeout_s: float = 20.0) -> None:
        """Stop every camera at once, wait for their last events, then flush and close the sinks."""
        self.ops.begin_stop()
        self.stopping.set()
        with self._reconfigure:  # a reload in progress finishes (or gives up) first
            self._shutdown(timeout_s)

    def _drain(self, pipelines: list[CameraPipeline], timeout_s: float) -> None:
        """Stop these pipelines together and wait (``timeout_s`` in all) for their last events."""
        for p in pipelines:
            p.stop()
        deadline = time.monotonic() + timeout_s
        for p in pipelines:
            if not p.done.wait(max(0.0, deadline - time.monotonic())):
                log.error("camera %s: pipeline did not finish within %.0f s of the stop", p.cam.id, timeout_s)
                self.failed.append(p.cam.id)

    def _shutdown(self, timeout_s: float) -> None:
        self._drain(self.pipelines, timeout_s)
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

    # -- configuration reload (SIGHUP) ----------------------------------------------------
    def reload(self, settings: Settings) -> bool:
        """Apply a new configuration while running, restarting only what changed.

        ``settings`` is the whole new configuration (every shard's cameras; this replica keeps
        its shard). Keys only a restart applies (:data:`daemon.reconfig.RESTART_ONLY`) keep their
        running values, each named in a WARNING. A stopped or restarted camera is drained first:
        whoever is inside gets their exit; unchanged cameras keep running untouched. Returns False,
        having changed nothing, when the new configuration cannot work here (each problem is
        logged as ``section.key: problem``).
        """
        while not self._started.wait(0.5):  # a SIGHUP while models load applies once cameras run
            if self.stopping.is_set():
                break
        with self._reconfigure:
            if self.stopping.is_set():
                log.warning("configuration reload ignored: the daemon is stopping")
                return False
            self.ops.reloading()
            try:
                applied = self._reload(settings)
            finally:
                self.ops.reloaded()
        if applied:
            self.metrics.config_reloads.labels("applied").inc()
            self.metrics.config_reload_ok.set(1)
        return applied

    def reload_rejected(self, problems: list[str], source: str = "the new configuration") -> None:
        """A reload that cannot apply: each problem logged (``section.key: problem``), counted."""
        log.error("configuration reload rejected: %s has %d problem(s); the daemon keeps running unchanged",
                  source, len(problems))
        for problem in problems:
            log.error("%s", problem)
        self.metrics.config_reloads.labels("rejected").inc()
        self.metrics.config_reload_ok.set(0)

    def _rejected(self, problems: list[str]) -> bool:
        self.reload_rejected(problems)
        return False

    def _reload(self, settings: Settings) -> bool:
        try:
            settings, kept = keep_restart_only(self.configured, settings)
        except ConfigError as e:
            return self._rejected(e.problems)
        for key in kept:
            log.warning("%s: changed, but only a restart applies it (systemctl restart regionwatch); "
                        "keeping the running value", key)
        fleet = FleetPlan.of(settings)  # [fleet] is restart-only: the same shard, maybe other cameras
        new = fleet.settings
        plan = plan_reload(self.settings, new)
        if plan.empty:
            self.configured, self.fleet, self.settings = settings, fleet, new
            log.info("configuration reloaded: nothing to rebuild%s",
                     f" ({', '.join(plan.keys)} changed)" if plan.keys else " (no change)")
            return True
        # Everything that can fail is done before anything stops: a failure changes nothing.
        problems = sink_problems(new, plan.sinks) + self._outbox_problems(plan)
        if problems:
            return self._rejected(problems)
        detector = None
        if plan.detector:
            try:
                detector = self._make_detector(new.detector)
            except ModelLoadError as e:
                return self._rejected([str(e)])
        starting = [c for c in new.cameras if c.id in plan.added or c.id in plan.restarted]
        trackers = {}
        try:
            for c in starting:
                trackers[c.id] = build_tracker(new, c, self._shared, self.metrics)
        except Exception as e:  # SAM2: the shared server refused a camera
            self._close_trackers(trackers)
            return self._rejected([f"tracker: cannot track the new cameras: {type(e).__name__}: {e}"])
        if self.stopping.is_set():
            self._close_trackers(trackers)
            log.warning("configuration reload abandoned: the daemon is stopping")
            return False
        log.info("configuration reload: %s (changed: %s)", plan.describe(), ", ".join(plan.keys))
        self._stop_cameras(plan.removed + plan.restarted, removed=plan.removed)  # their exits reach the sinks now
        if self.stopping.is_set():  # a stop signal while they drained: the shutdown takes over
            self._close_trackers(trackers)
            log.warning("configuration reload interrupted by the stop: cameras %s stopped, nothing started",
                        ", ".join(plan.removed + plan.restarted))
            return False
        if detector is not None:
            self.detector.replace(detector)
        previous = self.settings
        self.configured, self.fleet, self.settings = settings, fleet, new
        if plan.added or plan.removed:
            self.switches.set_cameras([c.id for c in new.cameras if c.enabled])
        if plan.sinks:
            self._rebuild_sinks(plan.sinks, previous)
        self._start_cameras(starting, trackers)
        if detector is not None:
            self._export_build()
        self.fleet.export(self.metrics)
        log.info("configuration reloaded: %s", plan.describe())
        return True

    def _outbox_problems(self, plan: ReloadPlan) -> list[str]:
        """The MQTT sink is not rebuilt while its outbox holds events only in memory (the state
        disk fails): closing it would lose them."""
        held = sum(getattr(getattr(k, "outbox", None), "in_memory", 0) for k in self.sinks if k.name in plan.sinks)
        if not held:
            return []
        return [(f"sinks.mqtt: {held} event(s) wait in memory because the state disk cannot be written; "
                 "reload again once it recovers (see /readyz)")]

    @staticmethod
    def _close_trackers(trackers: dict) -> None:
        """Trackers built for a reload that does not happen (SAM2: their cameras leave the server)."""
        for tracker in trackers.values():
            tracker.close()

    def _stop_cameras(self, cameras: Collection[str], timeout_s: float = 20.0, *, removed: Collection[str] = ()) -> None:
        """Stop and drain these cameras' pipelines: everyone inside gets their exit. The
        ``removed`` ones also lose their stream series (a gone camera is not a camera down)."""
        stopping = [p for p in self.pipelines if p.cam.id in cameras]
        self._drain(stopping, timeout_s)
        for p in stopping:
            # Its source may still be in a network read: one connection per camera at a time, and
            # its last state change must reach the sinks before the camera is gone from them.
            if not p.source.join(p.cam.open_timeout_s + p.cam.read_timeout_s):
                log.warning("camera %s: the stopped source has not ended yet", p.cam.id)
            p.tracker.close()
            if self.preview is not None:
                self.preview.forget(p.cam.id)
            with self._emit_locks[p.cam.id], self._sinks_lock:
                self._running.discard(p.cam.id)
                for key in [k for k in self._occupancy if k[0] == p.cam.id]:
                    del self._occupancy[key]
                    with contextlib.suppress(KeyError):
                        self.metrics.occupancy.remove(*key)
                self._people.pop(p.cam.id, None)
                self._streams.pop(p.cam.id, None)
            # A restarted camera's people keep getting new ids: track_id stays unique per camera.
            self._next_track[p.cam.id] = p.identity.next_id
        self.pipelines = [p for p in self.pipelines if p not in stopping]
        for camera in removed:
            self._forget_stream_series(camera)

    def _forget_stream_series(self, camera: str) -> None:
        m = self.metrics
        for metric in (m.stream_up, m.stream_fps):
            with contextlib.suppress(KeyError):
                metric.remove(camera)
        for state in SourceState:
            with contextlib.suppress(KeyError):
                m.stream_state.remove(camera, state.value)

    @contextlib.contextmanager
    def _events_held(self):
        """No event or occupancy change reaches a sink meanwhile (every camera's emit lock)."""
        with contextlib.ExitStack() as stack:
            for camera in sorted(self._emit_locks):
                stack.enter_context(self._emit_locks[camera])
            yield

    def _rebuild_sinks(self, names: Collection[str], previous: Settings) -> None:
        """Close the named sinks (after they flushed), build them from the new settings (from
        ``previous`` if that fails), tell them the current state, then start them. Events wait
        for the new sinks meanwhile."""
        with self._events_held():
            for sink in [k for k in self.sinks if k.name in names]:
                try:
                    sink.handover()
                except Exception:
                    log.exception("sink %s: close failed", sink.name)
            new: list[Sink] = []
            for settings, which in ((self.settings, "new"), (previous, "previous")):
                try:  # the preconditions were checked: only a disk failing now, or a race, ends here
                    new = self._build_sinks(settings, names, start=False)
                    break
                except Exception as e:
                    log.error("sinks %s: cannot build them from the %s configuration: %s: %s",
                              ", ".join(sorted(names)), which, type(e).__name__, e)
            order = {name: i for i, name in enumerate(SINK_ORDER)}
            with self._sinks_lock:
                kept = [k for k in self.sinks if k.name not in names]
                self.sinks = sorted(kept + new, key=lambda k: order.get(k.name, len(order)))
                for c in self.settings.cameras:  # what is true now, before their first connection
                    if not c.enabled:
                        continue
                    for sink in new:
                        sink.detection_state(c.id, self.switches.enabled(c.id))
                        sink.stream_state(c.id, self._streams.get(c.id, False))
                        sink.people(c.id, self._people.get(c.id, 0))
                for (camera, region), count in self._occupancy.items():
                    for sink in new:
                        sink.occupancy(camera, region, count)
            for sink in new:
                sink.start()

    def _start_cameras(self, cameras: list[CameraConfig], trackers: dict) -> None:
        started = [self._pipeline(c, trackers[c.id]) for c in cameras]
        for p in started:
            if self.preview is not None:
                p.observers.append(self.preview.watch(p.cam))
            for r in p.cam.regions:
                self.metrics.occupancy.labels(p.cam.id, r.id).set(0)
            with self._sinks_lock:
                self._running.add(p.cam.id)
                for sink in self.sinks:
                    sink.detection_state(p.cam.id, self.switches.enabled(p.cam.id))
        self.ops.init_series(cameras)
        self.pipelines = self.pipelines + started
        for p in started:
            p.start()

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

    def stream_state_changed(self, camera: str, state, pipeline: CameraPipeline | None = None) -> None:
        if pipeline is not None and pipeline not in self.pipelines:
            return  # a late word from the source of a pipeline a reload replaced: not this camera's now
        name = getattr(state, "value", str(state))
        for s in SourceState:
            self.metrics.stream_state.labels(camera, s.value).set(1 if s.value == name else 0)
        self.metrics.stream_up.labels(camera).set(1 if name == "streaming" else 0)
        with self._sinks_lock:
            if camera not in self._running:  # a late word from a source a reload stopped
                return
            self._streams[camera] = name == "streaming"
            for sink in self.sinks:
                sink.stream_state(camera, name == "streaming")

    def people_in_view(self, camera: str, count: int) -> None:
        """People the tracker sees on the camera now (only changes reach the sinks)."""
        if self._people.get(camera) == count:  # every frame: most bring no change, no lock for them
            return
        with self._sinks_lock:
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
        with self._sinks_lock:
            for sink in self.sinks:
                sink.detection_state(camera, enabled)

    def pipeline_failed(self, camera: str) -> None:
        self.failed.append(camera)
