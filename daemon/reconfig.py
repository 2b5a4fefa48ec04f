"""What a configuration reload changes: the running settings against the new ones.

``regionwatch run`` re-reads its configuration on SIGHUP (:meth:`daemon.app.App.reload`). This
module only compares; it builds nothing.

* :func:`keep_restart_only` puts back the running value of every key that a running daemon
  cannot swap safely (:data:`RESTART_ONLY`) and names the keys it put back, for a WARNING each.
* :func:`plan_reload` compares one replica's settings (after the fleet cut,
  :class:`daemon.fleet.FleetPlan`) and says what to rebuild: cameras to start, stop or restart,
  the detector, and which sinks. Whatever it does not name keeps running untouched.

Example:
    >>> import tempfile
    >>> from daemon.config import Settings
    >>> model = tempfile.NamedTemporaryFile(suffix=".onnx")
    >>> def config(text):
    ...     return Settings.from_toml_text(f'[detector]\\nmodel = "{model.name}"\\n' + text)
    >>> cam = '[[cameras]]\\nid = "{0}"\\nurl = "rtsp://cam/{0}"\\n'
    >>> old = config(cam.format("hall") + cam.format("door"))
    >>> new = config('[metrics]\\nlisten = "127.0.0.1:9200"\\n' + cam.format("hall") + cam.format("yard"))
    >>> new, kept = keep_restart_only(old, new)
    >>> kept, new.metrics.listen
    (['metrics.listen'], '127.0.0.1:9108')
    >>> plan = plan_reload(old, new)
    >>> plan.added, plan.removed, plan.restarted, plan.unchanged, plan.detector, sorted(plan.sinks)
    (('yard',), ('door',), (), ('hall',), False, [])
    >>> plan.describe()
    'cameras started: yard; stopped: door; unchanged: hall'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from daemon.config import CameraConfig, ConfigError, Settings, format_validation_error

RESTART_ONLY = ("metrics", "state", "fleet", "snapshots", "preview", "tracker.backend", "tracker.sam2")
"""Keys a reload does not apply (only a restart does); the running values are kept.

The HTTP listener (``[metrics]``) and what is mounted on it (``[preview]``, ``[snapshots]``)
are bound once; the state folder (``[state]``) is locked and holds the outbox and ``seq``; the
shard (``[fleet]``) decides which cameras this replica owns; the SAM2 model and its server
(``tracker.backend``, ``[tracker.sam2]``) are shared by every camera and hold the GPU memory.
"""

DETECTOR_KEYS = ("detector.model", "detector.confidence", "detector.iou", "detector.imgsz", "detector.device",
                 "detector.min_box_area_px", "detector.runtime", "detector.threads", "detector.max_batch")
"""Keys of the detector model itself: a new one is loaded and swapped in; cameras keep running."""

EVERY_CAMERA_KEYS = ("detector.interval_s", "detector.tracking_interval_s", "detector.motion_gate",
                     "detector.idle_check_s", "tracker", "events", "refine")
"""Keys every camera's pipeline is built with (tracker, detector cadence, region logic, entry
refinement): every camera restarts (the people inside get their exits, then their entries)."""

SINK_ORDER = ("mqtt", "stdout", "jsonl")
"""Sink names in the order events reach them (the durable MQTT outbox first)."""

_MISSING = object()


def _tree(settings: Settings) -> dict[str, Any]:
    """The settings as nested dicts, cameras and their regions keyed by id (order does not count)."""
    data = settings.model_dump(by_alias=True)
    data["cameras"] = {c["id"]: {**c, "regions": {r["id"]: r for r in c["regions"]}} for c in data["cameras"]}
    return data


def _diff(a: Any, b: Any, key: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in a.keys() | b.keys():
            out += _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{key}.{k}" if key else str(k))
        return out
    return [] if a == b else [key]


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The dotted keys whose values differ, sorted; cameras and regions are named by id
    (``cameras.hall.regions.table.polygon``), a camera or region added or removed by its own key."""
    return sorted(_diff(_tree(old), _tree(new), ""))


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the running value put back for every :data:`RESTART_ONLY` key that differs,
    and those keys (sorted). Raises :class:`~daemon.config.ConfigError` when the result is not a
    valid configuration (say, a ``mask_overlap`` region while the running tracker is ByteTrack)."""
    kept = [k for k in changed_keys(old, new) if _under(k, RESTART_ONLY)]
    if not kept:
        return new, []
    data, running = new.model_dump(by_alias=True), old.model_dump(by_alias=True)
    for prefix in RESTART_ONLY:
        *parents, last = prefix.split(".")
        src, dst = running, data
        for p in parents:
            src, dst = src[p], dst[p]
        dst[last] = src[last]
    try:
        merged = type(new).model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"{p} (with the running value of {', '.join(kept)}, which only a restart changes)"
                           for p in format_validation_error(e)]) from None
    return merged, kept


def _announced(cam: CameraConfig) -> tuple:
    """What the MQTT sink announces about a camera (topics, Home Assistant names)."""
    return cam.display_name, tuple((r.id, r.display_name) for r in cam.regions)


@dataclass(frozen=True)
class ReloadPlan:
    """What one replica rebuilds for a new configuration (camera ids in configuration order)."""

    added: tuple[str, ...]  # cameras to start
    removed: tuple[str, ...]  # cameras to stop (drained: the people inside get their exits)
    restarted: tuple[str, ...]  # cameras whose settings changed: stopped, drained, started anew
    unchanged: tuple[str, ...]  # cameras that keep running untouched (same tracks)
    detector: bool  # a new detector model to load and swap in
    sinks: frozenset[str]  # sinks to close (after they flushed) and build anew, by name
    keys: tuple[str, ...]  # every changed key (for the log)

    @property
    def empty(self) -> bool:
        """Nothing to rebuild (changed keys, if any, need nothing: say a disabled camera's URL)."""
        return not (self.added or self.removed or self.restarted or self.detector or self.sinks)

    def describe(self) -> str:
        """One line for the log, e.g. ``cameras started: yard; stopped: door; unchanged: hall``."""
        parts = [f"{what}: {', '.join(ids)}" for what, ids in (
            ("started", self.added), ("stopped", self.removed), ("restarted", self.restarted),
            ("unchanged", self.unchanged)) if ids]
        out = ["cameras " + "; ".join(parts)] if parts else ["no camera"]
        if self.detector:
            out.append("detector model reloaded")
        if self.sinks:
            out.append("sinks rebuilt: " + ", ".join(s for s in SINK_ORDER if s in self.sinks))
        return "; ".join(out)


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """What to rebuild to go from the running settings ``old`` to ``new`` (one replica's view,
    restart-only keys already put back by :func:`keep_restart_only`).

    Example: a region renamed restarts its camera and rebuilds the MQTT sink (new topics and
    Home Assistant entities); a new detector threshold swaps the detector only.
        >>> import tempfile
        >>> from daemon.config import Settings
        >>> model = tempfile.NamedTemporaryFile(suffix=".onnx")
        >>> def config(region, confidence):
        ...     return Settings.from_toml_text(f'''
        ... [detector]
        ... model = "{model.name}"
        ... confidence = {confidence}
        ... [sinks.mqtt]
        ... enabled = true
        ... [[cameras]]
        ... id = "hall"
        ... url = "rtsp://cam/1"
        ... [[cameras.regions]]
        ... id = "{region}"
        ... polygon = [[0, 0], [9, 0], [9, 9]]
        ... ''')
        >>> plan = plan_reload(config("table", 0.35), config("counter", 0.35))
        >>> plan.restarted, sorted(plan.sinks), plan.keys
        (('hall',), ['mqtt'], ('cameras.hall.regions.counter', 'cameras.hall.regions.table'))
        >>> plan = plan_reload(config("table", 0.35), config("table", 0.5))
        >>> plan.restarted, plan.unchanged, plan.detector, plan.sinks
        ((), ('hall',), True, frozenset())
    """
    keys = changed_keys(old, new)
    before = {c.id: c for c in old.cameras if c.enabled}
    after = {c.id: c for c in new.cameras if c.enabled}
    every = any(_under(k, EVERY_CAMERA_KEYS) for k in keys)
    added = tuple(c for c in after if c not in before)
    removed = tuple(c for c in before if c not in after)
    restarted = tuple(c for c in after if c in before and (every or before[c] != after[c]))
    unchanged = tuple(c for c in after if c in before and c not in restarted)
    sinks = set()
    if old.sinks.stdout != new.sinks.stdout:
        sinks.add("stdout")
    if old.sinks.jsonl != new.sinks.jsonl:
        sinks.add("jsonl")
    # The MQTT sink announces the cameras (retained topics, Home Assistant discovery with the
    # detector model's name): a rebuilt one republishes discovery and clears what is gone.
    announced_changed = any(_announced(before[c]) != _announced(after[c]) for c in restarted)
    if old.sinks.mqtt != new.sinks.mqtt or new.sinks.mqtt.enabled and (
            added or removed or announced_changed or old.detector.model != new.detector.model):
        sinks.add("mqtt")
    return ReloadPlan(added, removed, restarted, unchanged, any(_under(k, DETECTOR_KEYS) for k in keys),
                      frozenset(sinks), tuple(keys))
