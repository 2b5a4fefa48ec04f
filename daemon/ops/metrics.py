"""Prometheus metrics of the daemon, all in one registry per running app.

Labelled by camera (and region, reason, type, sink where they apply) — never by track id or URL.
Names follow Prometheus conventions: base units, ``_total`` counters, ``_seconds``, ``_bytes``.

Example:
    >>> m = Metrics()
    >>> m.frames_decoded.labels(camera="hall").inc()
    >>> b"regionwatch_frames_decoded_total" in m.exposition()
    True
    >>> hall = m.camera("hall")  # the same series, looked up once per camera
    >>> hall.frames_decoded.inc(); m.frames_decoded.labels("hall")._value.get()
    2.0
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

NS = "regionwatch"

STAGES = ("decode", "jpeg", "detect", "track", "regions")
"""Stages of ``regionwatch_stage_cpu_seconds_total``: what one camera's CPU time is spent on."""


class Metrics:
    """Every metric the daemon exports, created on a private :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, fds

        # Sources and frame buffer
        self.frames_decoded = Counter(f"{NS}_frames_decoded", "Frames decoded.", ["camera"], registry=r)
        self.frames_skipped = Counter(
            f"{NS}_frames_skipped", "Frames deliberately not processed, by reason.", ["camera", "reason"], registry=r
        )
        self.frames_processed = Counter(
            f"{NS}_frames_processed", "Frames that went through the pipeline.", ["camera"], registry=r
        )
        self.frames_buffered = Gauge(f"{NS}_frames_buffered", "Frames in the rolling buffer.", ["camera"], registry=r)
        self.buffer_bytes = Gauge(
            f"{NS}_frame_buffer_bytes", "Bytes held in the frame buffer (JPEG history, recent frames).", ["camera"],
            registry=r,
        )
        self.stream_up = Gauge(f"{NS}_stream_up", "1 while the camera is streaming.", ["camera"], registry=r)
        self.stream_state = Gauge(
            f"{NS}_stream_state", "1 for the camera's current state.", ["camera", "state"], registry=r
        )
        self.reconnects = Counter(f"{NS}_stream_reconnects", "Stream reconnect attempts.", ["camera"], registry=r)
        self.stream_fps = Gauge(f"{NS}_stream_fps", "Measured decode rate, frames per second.", ["camera"], registry=r)
        self.decode_seconds = Histogram(
            f"{NS}_decode_seconds", "Time to decode one frame.", ["camera"], buckets=_LATENCY_BUCKETS, registry=r
        )

        # Detector and tracker
        self.detector_runs = Counter(f"{NS}_detector_runs", "Detector invocations.", ["camera"], registry=r)
        self.detector_seconds = Histogram(
            f"{NS}_detector_seconds", "Detector latency per frame.", ["camera"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.detections = Counter(f"{NS}_detections", "People detected (boxes).", ["camera"], registry=r)
        self.tracker_seconds = Histogram(
            f"{NS}_tracker_step_seconds", "Tracker step latency.", ["camera"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.people_tracked = Gauge(f"{NS}_people_tracked", "People currently tracked.", ["camera"], registry=r)
        self.tracks_started = Counter(f"{NS}_tracks_started", "Tracks started.", ["camera"], registry=r)
        self.tracks_ended = Counter(f"{NS}_tracks_ended", "Tracks ended.", ["camera"], registry=r)
        self.refine_budget_exceeded = Counter(
            f"{NS}_refine_budget_exceeded", "Entry refinements stopped by their time budget.", ["camera"], registry=r
        )

        # Regions and events
        self.occupancy = Gauge(f"{NS}_region_occupancy", "People inside the region.", ["camera", "region"], registry=r)
        self.events = Counter(f"{NS}_events", "Events emitted.", ["camera", "region", "type"], registry=r)

        # Sinks
        self.sink_publish = Counter(
            f"{NS}_sink_publish", "Sink publish attempts by result.", ["sink", "result"], registry=r
        )
        self.outbox_depth = Gauge(f"{NS}_outbox_events", "Events waiting in the MQTT outbox.", registry=r)
        self.outbox_dropped = Counter(
            f"{NS}_outbox_dropped", "Events dropped from the outbox by a bound.", ["reason"], registry=r
        )
        self.mqtt_connected = Gauge(f"{NS}_mqtt_connected", "1 while connected to the MQTT broker.", registry=r)

        # Process
        self.gpu_memory = Gauge(f"{NS}_gpu_memory_allocated_bytes", "CUDA memory allocated by torch.", ["device"], registry=r)
        self.loop_heartbeat = Gauge(
            f"{NS}_main_loop_heartbeat_timestamp_seconds", "Last time the main loop turned.", registry=r
        )
        self.ready = Gauge(f"{NS}_ready", "1 when models are loaded and a camera streams.", registry=r)
        self.build = Info(f"{NS}_build", "Version, tracker backend and model names.", registry=r)
        # Configuration reloads (SIGHUP): applied, or rejected with the running configuration kept
        self.config_reloads = Counter(f"{NS}_config_reloads", "Configuration reloads by result.", ["result"], registry=r)
        self.config_reload_ok = Gauge(
            f"{NS}_config_last_reload_successful", "1 unless the last configuration reload was rejected.", registry=r
        )
        for result in ("applied", "rejected"):
            self.config_reloads.labels(result)
        self.config_reload_ok.set(1)

        # Fleet ([fleet] shard): which replica this is and how many cameras it runs
        self.shard = Info(f"{NS}_shard", "This replica's shard index and the shard count (0 of 1 alone).", registry=r)
        self.cameras = Gauge(f"{NS}_cameras", "Cameras this replica runs (its shard's share).", registry=r)
        self.cameras_configured = Gauge(
            f"{NS}_cameras_configured", "Cameras in the configuration, over all shards.", registry=r
        )

        # SAM2 server (one worker per device serving every camera; see daemon/tracking/sam2_server.py)
        self.sam2_queue_wait = Histogram(
            f"{NS}_sam2_queue_wait_seconds",
            "Time a camera's request waited for the SAM2 worker (what the per-model lock used to cost).",
            ["camera"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.sam2_tick_seconds = Histogram(
            f"{NS}_sam2_tick_seconds", "One SAM2 worker tick (all cameras served together).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.sam2_people = Gauge(f"{NS}_sam2_people", "People the SAM2 server tracks over all cameras.", registry=r)
        self.sam2_people_budget = Gauge(
            f"{NS}_sam2_people_budget", "Most people the SAM2 server tracks at once (tracker.sam2.max_people_total).",
            registry=r,
        )
        self.sam2_people_rejected = Counter(
            f"{NS}_sam2_people_rejected", "New people not tracked because a person budget was full (overload).",
            ["camera"], registry=r,
        )
        self.sam2_reanchors = Counter(
            f"{NS}_sam2_reanchors", "People re-prompted from the detector, by reason (lost, disagree, age).",
            ["camera", "reason"], registry=r,
        )
        self.sam2_resets = Counter(
            f"{NS}_sam2_resets", "SAM2 camera state dropped on a stream discontinuity or a failed tick.",
            ["camera", "reason"], registry=r,
        )
        self.sam2_tentative_dropped = Counter(
            f"{NS}_sam2_tentative_dropped", "New tracks dropped before confirmation, by reason (lost, duplicate).",
            ["camera", "reason"], registry=r,
        )


        # State directory (seq store, outbox, snapshots): failed writes never stop delivery
        self.state_errors = Counter(
            f"{NS}_state_errors", "Failed writes to the state directory, by store.", ["store"], registry=r
        )
        self.state_degraded = Gauge(
            f"{NS}_state_degraded", "1 while writes to the store fail (not durable).", ["store"], registry=r
        )
        self.outbox_memory = Gauge(
            f"{NS}_outbox_memory_events", "Outbox events held only in memory (the state disk failed).", registry=r
        )


        # CPU by stage: thread CPU time (daemon.ops.cpu), incl. the inference runtime's own threads
        self.stage_cpu = Counter(
            f"{NS}_stage_cpu_seconds", "CPU time spent for the camera, by stage (" + ", ".join(STAGES) + ").",
            ["camera", "stage"], registry=r,
        )


    def camera(self, camera: str) -> CameraMetrics:
        """The series of one camera, bound once (the per-frame path does no label lookups)."""
        return CameraMetrics(self, camera)

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)


class CameraMetrics:
    """One camera's series of :class:`Metrics`, with the labels already applied."""

    def __init__(self, m: Metrics, camera: str):
        self.camera = camera
        self._m = m
        self.frames_decoded = m.frames_decoded.labels(camera)
        self.decode_seconds = m.decode_seconds.labels(camera)
        self.frames_processed = m.frames_processed.labels(camera)
        self.frames_buffered = m.frames_buffered.labels(camera)
        self.buffer_bytes = m.buffer_bytes.labels(camera)
        self.reconnects = m.reconnects.labels(camera)
        self.stream_fps = m.stream_fps.labels(camera)
        self.detector_runs = m.detector_runs.labels(camera)
        self.detector_seconds = m.detector_seconds.labels(camera)
        self.detections = m.detections.labels(camera)
        self.tracker_seconds = m.tracker_seconds.labels(camera)
        self.people_tracked = m.people_tracked.labels(camera)
        self.tracks_started = m.tracks_started.labels(camera)
        self.tracks_ended = m.tracks_ended.labels(camera)
        self.refine_budget_exceeded = m.refine_budget_exceeded.labels(camera)
        self.cpu = {stage: m.stage_cpu.labels(camera, stage) for stage in STAGES}  # CPU seconds by stage

    def skipped(self, reason: str, n: int = 1) -> None:
        """Frames not processed, by reason (``consumer_behind``, ``pipeline_error``)."""
        self._m.frames_skipped.labels(self.camera, reason).inc(n)
