"""Small typed records that pass between pipeline stages.

source → frame buffer → detector → tracker → region logic → events → sinks

Example:
    >>> import numpy as np
    >>> f = Frame(camera="hall", index=0, pts_s=0.0, wall_time=0.0, image=np.zeros((4, 6, 3), np.uint8))
    >>> f.size
    (6, 4)
    >>> Detections.empty().xyxy.shape
    (0, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame.

    ``index`` is the 0-based decode index, increasing across reconnects; ``pts_s`` is stream
    time in seconds, monotonic per camera; ``wall_time`` is UNIX time of the frame (for files,
    the run's start plus ``pts_s``). ``image`` is HxWx3 uint8 BGR.
    """

    camera: str
    index: int
    pts_s: float
    wall_time: float
    image: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Detections:
    """People found by the detector on one frame: boxes (N,4 xyxy pixels) and confidences (N,)."""

    xyxy: np.ndarray
    confidence: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


@dataclass(frozen=True, slots=True)
class TrackedPerson:
    """One person as the tracker sees them on one frame.

    ``mask`` (HxW bool, SAM2 only) is the person's segmentation at frame resolution.
    ``confirmed`` is False while a new track waits for the detector to see them a second time:
    region logic follows them but holds their entries back until then (a false detection that
    the follower kept alive for a moment must not become an event).
    ``footprint`` (SAM2 only) is the centre of the mask's lowest row and ``overlaps`` the fraction
    of the mask inside each of the camera's regions (config order), both computed where the mask
    is (on the GPU), so they are there even when the mask is not copied back.
    """

    track_id: int
    bbox: np.ndarray
    score: float
    mask: np.ndarray | None = None
    footprint: tuple[float, float] | None = None
    overlaps: tuple[float, ...] | None = None
    confirmed: bool = True


@dataclass(frozen=True, slots=True)
class TrackUpdate:
    """The tracker's output for one frame: who is visible, and whose track ended."""

    frame: Frame
    people: tuple[TrackedPerson, ...]
    ended: tuple[int, ...] = field(default=())
