"""The retained topics a daemon has published, remembered in its state directory.

Retained messages outlive the daemon on the broker. When the configuration stops producing a
topic (a region renamed, a camera disabled, Home Assistant discovery turned off, a new
``client_id`` or ``topic_prefix``), the old message would stay there for ever; for discovery
topics, Home Assistant would keep the old entity. So the sink remembers every retained topic it
publishes and, at start, clears (empty retained payload) those the current config no longer
produces. Clearing a discovery topic makes Home Assistant delete that entity.

The file is ``<state dir>/mqtt-retained-topics.json``, replaced atomically.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> reg = TopicRegistry(d)
    >>> reg.stale(["rw/hall/table/occupancy"])
    []
    >>> reg.remember(["rw/hall/table/occupancy", "rw/status"])
    >>> TopicRegistry(d).stale(["rw/hall/desk/occupancy", "rw/status"])
    ['rw/hall/table/occupancy']
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from daemon.statedir import write_atomic

log = logging.getLogger(__package__)


class TopicRegistry:
    """A persisted set of retained topic names."""

    FILE = "mqtt-retained-topics.json"

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir) / self.FILE
        self._topics: set[str] = set()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._topics = {str(t) for t in data["topics"]}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Losing the list only means old retained topics are not cleared: never fatal.
            log.warning("cannot read %s (%s); stale retained MQTT topics will not be cleared this time",
                        self.path, e)

    @property
    def topics(self) -> set[str]:
        return set(self._topics)

    def stale(self, current: Iterable[str]) -> list[str]:
        """Remembered topics that ``current`` no longer contains, sorted."""
        return sorted(self._topics - set(current))

    def remember(self, topics: Iterable[str]) -> None:
        """Add ``topics`` to the remembered set (written before they are published)."""
        new = self._topics | set(topics)
        if new != self._topics:
            self._write(new)

    def replace(self, topics: Iterable[str]) -> None:
        """Remember exactly ``topics`` (once the stale ones are cleared on the broker)."""
        new = set(topics)
        if new != self._topics:
            self._write(new)

    def _write(self, topics: set[str]) -> None:
        try:
            write_atomic(self.path, (json.dumps({"version": 1, "topics": sorted(topics)}, indent=0) + "\n").encode())
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)
            return
        self._topics = topics
