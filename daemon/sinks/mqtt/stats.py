"""Per-camera stats for MQTT, read from the daemon's Prometheus metrics (no second bookkeeping).

Every ``[sinks.mqtt] stats_interval_s`` the sink publishes, retained, on
``{prefix}/{camera}/stats``::

    {"camera": "hall", "time": "2026-01-01T10:00:00.000Z", "interval_s": 30.0,
     "fps": 9.98, "processed_fps": 9.98, "frames_processed": 1394, "frames_skipped": 0, "skipped": 0,
     "people": 1, "detector_runs": 60, "detector_ms": 41.2, "detection": "ON", "stream": "online"}

``fps`` is the measured decode rate, ``processed_fps`` the pipeline's rate over the interval,
``frames_skipped`` all skipped frames so far (``skipped``: in the interval), ``detector_ms`` the
mean detector time over the interval (null when the detector did not run).

Example:
    >>> from daemon.ops.metrics import Metrics
    >>> m = Metrics()
    >>> stats = CameraStats(m, clock=iter([0.0, 10.0]).__next__, wall=lambda: 0.0)
    >>> m.frames_processed.labels("hall").inc(100); m.detector_seconds.labels("hall").observe(0.05)
    >>> m.frames_processed.labels("hall").inc(100); m.detector_seconds.labels("hall").observe(0.03)
    >>> stats.sample(["hall"])["hall"]["detector_ms"]
    40.0
    >>> m.frames_processed.labels("hall").inc(50)
    >>> s = stats.sample(["hall"])["hall"]; s["processed_fps"], s["frames_processed"], s["detector_ms"]
    (5.0, 250, None)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from daemon.events import iso_utc


class CameraStats:
    """Turns the metrics registry into one stats dict per camera (rates over the last interval)."""

    def __init__(self, metrics, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.metrics = metrics
        self._clock, self._wall = clock, wall
        self._last: dict[str, tuple[float, float, float, float, float]] = {}

    def _totals(self) -> dict[tuple[str, str], float]:
        """(sample name, camera) → value, summed over other labels (e.g. skip reasons)."""
        wanted = {
            "regionwatch_frames_processed_total", "regionwatch_frames_skipped_total", "regionwatch_stream_fps",
            "regionwatch_detector_seconds_sum", "regionwatch_detector_seconds_count",
        }
        out: dict[tuple[str, str], float] = {}
        for family in self.metrics.registry.collect():
            for s in family.samples:
                if s.name in wanted and "camera" in s.labels:
                    key = (s.name, s.labels["camera"])
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def sample(self, cameras: Iterable[str], extra: Callable[[str], dict] | None = None) -> dict[str, dict]:
        """Stats per camera since the previous call (the first call covers the time since start)."""
        now, wall = self._clock(), self._wall()
        totals = self._totals()
        out: dict[str, dict] = {}
        for cam in cameras:
            def get(name: str) -> float:
                return totals.get((name, cam), 0.0)

            processed, skipped = get("regionwatch_frames_processed_total"), get("regionwatch_frames_skipped_total")
            det_sum, det_n = get("regionwatch_detector_seconds_sum"), get("regionwatch_detector_seconds_count")
            t0, p0, s0, ds0, dn0 = self._last.get(cam, (None, 0.0, 0.0, 0.0, 0.0))
            self._last[cam] = (now, processed, skipped, det_sum, det_n)
            dt = None if t0 is None else max(now - t0, 1e-9)
            runs = det_n - dn0
            out[cam] = {
                "camera": cam,
                "time": iso_utc(wall),
                "interval_s": None if dt is None else round(dt, 3),
                "fps": round(get("regionwatch_stream_fps"), 2),
                "processed_fps": None if dt is None else round((processed - p0) / dt, 2),
                "frames_processed": int(processed),
                "frames_skipped": int(skipped),
                "skipped": int(skipped - s0),
                "detector_runs": int(runs),
                "detector_ms": round((det_sum - ds0) / runs * 1000, 2) if runs > 0 else None,
                **(extra(cam) if extra else {}),
            }
        return out
