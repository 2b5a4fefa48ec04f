"""What every tracker backend provides to the pipeline."""

from __future__ import annotations

from typing import Protocol

from daemon.records import Detections, Frame, TrackUpdate


class Tracker(Protocol):
    """A per-camera tracker.

    ``update`` is called for every processed frame, with ``detections`` on the frames where the
    detector ran (None elsewhere). It returns a :class:`TrackUpdate` when it has new positions
    for this frame, or None when it did not look at this frame (SAM2 above ``track_fps``).
    ``finish`` ends every track (end of stream). ``wants_detection``: the tracker asks for the
    detector on the next frame (ByteTrack when following lost someone). ``close`` releases what
    the tracker holds (SAM2: its cameras on the shared server) when its camera is removed.
    """

    def update(self, frame: Frame, detections: Detections | None) -> TrackUpdate | None: ...

    def finish(self, frame: Frame | None) -> TrackUpdate | None: ...

    @property
    def active(self) -> int: ...

    @property
    def wants_detection(self) -> bool: ...

    def close(self) -> None: ...
