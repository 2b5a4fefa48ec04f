"""Per-camera detection switches (on / off), kept across restarts in the state directory.

Home Assistant's switch (or any MQTT client, on ``{prefix}/{camera}/detection/set``) turns
detection off for a camera: its pipeline then passes frames on without detecting or tracking
(people inside get their exit, occupancy drops to 0). The choice survives restarts in
``<state dir>/detection.json``; cameras not in the file are on.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> sw = DetectionSwitches(d, ["hall", "yard"])
    >>> sw.set("yard", False), sw.set("yard", False), sw.enabled("yard"), sw.enabled("hall")
    (True, False, False, True)
    >>> DetectionSwitches(d, ["hall", "yard"]).enabled("yard")
    False
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from daemon.statedir import write_atomic

log = logging.getLogger(__name__)


class DetectionSwitches:
    """Whether detection runs, per camera; ``set`` persists at once (atomic file replace)."""

    FILE = "detection.json"

    def __init__(self, state_dir: str | os.PathLike[str], cameras: Iterable[str]):
        self.path = Path(state_dir) / self.FILE
        self._lock = threading.Lock()
        saved = self._read()
        self._on = {c: saved.get(c, True) for c in cameras}
        off = sorted(c for c, on in self._on.items() if not on)
        if off:
            log.info("detection is switched off for camera(s) %s (%s)", ", ".join(off), self.path)

    def _read(self) -> dict[str, bool]:
        try:
            return {str(c): bool(on) for c, on in json.loads(self.path.read_text(encoding="utf-8"))["cameras"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cannot read %s (%s): detection is on for every camera", self.path, e)
            return {}

    def set_cameras(self, cameras: Iterable[str]) -> None:
        """The cameras changed (a reload): keep the switches of those that stay; a new camera
        takes its saved switch (it may have been configured before), else on."""
        with self._lock:
            saved = self._read()
            self._on = {c: self._on.get(c, saved.get(c, True)) for c in cameras}

    def enabled(self, camera: str) -> bool:
        return self._on.get(camera, True)

    def set(self, camera: str, on: bool) -> bool:
        """Switch ``camera``; True when that changed something. Raises KeyError for an unknown camera."""
        with self._lock:
            if camera not in self._on:
                raise KeyError(camera)
            if self._on[camera] == bool(on):
                return False
            self._on[camera] = bool(on)
            self._write()
            return True

    def _write(self) -> None:
        write_atomic(self.path, (json.dumps({"version": 1, "cameras": self._on}, sort_keys=True) + "\n").encode())
