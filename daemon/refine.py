"""Entry refinement: look back through the frame buffer for the frame a person really entered.

The tracker only sees a person where the detector found them, and the detector runs every
``detector.interval_s`` (with ByteTrack, positions only change on detector frames), so region
logic reports an entry at the first *detector* frame that saw the person inside: up to one
interval late, later still when detection missed them. The rolling frame buffer still holds the
frames in between, so when region logic emits an ``entry``, :class:`EntryRefiner` asks a
:class:`Lookback` for the earliest buffered frame at which that person was already inside, and
rewrites the entry's ``frame``, ``pts_s``, ``wall_time``, ``bbox``, ``anchor`` and ``score``
to it; ``detected_frame`` keeps the detection's frame and ``refined`` says how it went:

* ``"yes"``: the frame before the reported one shows the person outside the region;
* ``"person_lost"``: the person could not be found on the frame before it (occluded, missed by
  the detector, or out of view): the reported frame is the earliest one known inside;
* ``"buffer_too_short"``: the person is inside on the oldest buffered frame that could be used;
* ``"budget_exceeded"``: the time budget ran out (counted in
  ``regionwatch_refine_budget_exceeded_total``): the earliest frame found so far is reported;
* ``"unsupported"``: the lookback cannot judge this region's anchor (``mask_overlap`` needs masks);
* ``"disabled"``: ``[refine] enabled = false``; the entry is the detection;
* ``"failed"``: the lookback raised (logged); the entry is the detection.

Exit events of a refined entry get their ``dwell_s`` measured from the refined entry.

Budget: refinement runs on the camera's pipeline thread, so every event and frame of that camera
waits for it. All entries emitted on one frame share one budget of ``budget_s`` seconds; a step
(a detector run) starts only if it is expected to finish within what is left, so the pipeline is
never held longer than ``budget_s`` (give or take a step slower than every recent one).

:class:`DetectorLookback` (any tracker backend) runs the person detector on buffered frames and
*bisects*: inside/outside is monotone over the short stretch of an entry, so the first frame
inside, between the last frame the tracker saw the person outside (or the previous detector run)
and the detection, takes ``ceil(log2(n + 1))`` detector runs for ``n`` frames in between
(4 for ``interval_s = 1`` at 10 fps) where walking back frame by frame takes up to ``n`` (9) —
on a CPU at ~0.1–0.3 s per run that decides whether refinement fits a sub-second budget at all.
The person is matched on each probed frame by box continuity with the nearest frame already
known to have them inside: best IoU, else the nearest box of similar height within the distance a
walker can cover in the time between (the gate widens with the gap). A SAM2 backend can implement
:class:`Lookback` by tracking the person backwards instead (see its docstring).

Example (a stand-in detector that sees one person walking down into the region, 5 px per
frame; the detector ran on frames 0 and 10, the person was first seen inside on frame 10):

    >>> import numpy as np
    >>> from daemon.config import RegionConfig
    >>> from daemon.events import RegionTransition
    >>> from daemon.framebuffer import FrameBuffer
    >>> from daemon.records import Detections, Frame
    >>> from daemon.regions import Zone
    >>> zone = Zone(RegionConfig(id="mat", polygon=[[0, 130], [200, 130], [200, 230], [0, 230]]))
    >>> buf = FrameBuffer("hall", lossless=True, encode_all=False, buffer_s=10)
    >>> for i in range(11):  # frame i is filled with the value 20 * i: the stand-in detector reads it
    ...     _ = buf.remember(Frame("hall", i, i / 10, 1e9 + i / 10, np.full((240, 320, 3), i * 20, np.uint8)))
    >>> def detect(image):
    ...     i = round(float(image.mean()) / 20)
    ...     return Detections(np.array([[80, 10 + 5 * i, 120, 110 + 5 * i]], np.float32), np.array([0.9], np.float32))
    >>> refiner = EntryRefiner("hall", buf, [zone], DetectorLookback(detect), budget_s=5.0)
    >>> refiner.detector_ran(0, 0.01); refiner.detector_ran(10, 0.01)
    >>> entry = RegionTransition("entry", "hall", "mat", 1, 10, 1.0, 1e9 + 1.0, (80.0, 60.0, 120.0, 160.0),
    ...                          (100.0, 160.0), 0.9)
    >>> [(t.frame, t.detected_frame, t.refined, t.anchor) for t in refiner.process([entry])]
    [(4, 10, 'yes', (100.0, 130.0))]
    >>> refiner.stats.probes  # frames 5, 2, 3, 4 (a walk back from 9 would look at 6)
    4
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from daemon.events import RegionTransition
from daemon.framebuffer import BufferedFrame
from daemon.geometry import box_iou
from daemon.records import Detections, TrackedPerson, TrackUpdate
from daemon.regions import Zone

if TYPE_CHECKING:
    from daemon.config import RefineConfig
    from daemon.framebuffer import FrameBuffer

log = logging.getLogger(__name__)

YES = "yes"
PERSON_LOST = "person_lost"
BUFFER_TOO_SHORT = "buffer_too_short"
BUDGET_EXCEEDED = "budget_exceeded"
UNSUPPORTED = "unsupported"
DISABLED = "disabled"
FAILED = "failed"


class Deadline:
    """A processing-time budget shared by the refinements of one frame.

    Example:
        >>> d = Deadline(0.5, clock=lambda: 10.0)
        >>> d.remaining(), d.allows(0.4), d.allows(0.6)
        (0.5, True, False)
    """

    def __init__(self, budget_s: float, *, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.start = clock()
        self.end = self.start + budget_s

    def remaining(self) -> float:
        return self.end - self._clock()

    def allows(self, expected_s: float) -> bool:
        """Whether a step expected to take ``expected_s`` seconds still ends within the budget."""
        return self.remaining() >= expected_s

    def elapsed(self) -> float:
        return self._clock() - self.start


@dataclass(frozen=True, slots=True)
class Sighting:
    """A person inside a region on one frame: where, and the frame's stream and wall times."""

    index: int
    pts_s: float
    wall_time: float
    bbox: tuple[float, float, float, float]
    anchor: tuple[float, float]
    score: float
    mask_bbox: tuple[float, float, float, float] | None = None
    mask_polygon: list[list[float]] | None = None

    @classmethod
    def of_transition(cls, t: RegionTransition) -> Sighting:
        return cls(t.frame, t.pts_s, t.wall_time, tuple(t.bbox), tuple(t.anchor), t.score, t.mask_bbox, t.mask_polygon)


@dataclass(frozen=True, slots=True)
class EntryQuery:
    """One entry to refine.

    ``detected`` is where the tracker first saw the person inside. ``since_index`` is the frame
    before it where the person was last known *not* inside: the tracker's last sighting of them
    (outside) when ``since_seen``, else the previous detector run, which did not report them (it
    missed them, or the track was not confirmed yet) — the lookback may then go further back.
    """

    camera: str
    zone: Zone
    track_id: int
    detected: Sighting
    since_index: int
    since_seen: bool


@dataclass(frozen=True, slots=True)
class LookbackResult:
    """The earliest frame found with the person inside, and how the search ended (module doc)."""

    entry: Sighting
    status: str
    probes: int = 0


class Lookback(Protocol):
    """Finds, in buffered frames, the earliest frame at which a person was already inside a region.

    ``frames`` are the buffered frames older than ``query.detected`` (oldest first; decode them
    with :meth:`BufferedFrame.decode`). Implementations return ``query.detected`` itself when they
    find nothing earlier, check ``deadline.allows(expected step time)`` before every step, and
    stop with status ``"budget_exceeded"`` when it says no.

    A SAM2 implementation (``daemon/tracking/sam2_session.py``) tracks backwards: a fresh
    ``StreamingSam2Session`` steps the detection frame, ``add_person(track_id, box=detected.bbox)``,
    then steps ``reversed(frames)`` one by one (its memory only uses distances between steps, so
    this is SAM2's reverse propagation), testing each mask with ``query.zone`` and stopping when
    the anchor is outside (``"yes"``), the person is not ``present`` (``"person_lost"``), the
    frames run out (``"buffer_too_short"``) or the deadline says so. ``detector_ran`` is optional.
    """

    def find_entry(self, query: EntryQuery, frames: Sequence[BufferedFrame], deadline: Deadline) -> LookbackResult: ...


def match_box(
    ref: Sequence[float],
    boxes: np.ndarray,
    dt_s: float,
    *,
    min_iou: float = 0.3,
    max_speed: float = 1.5,
    slack: float = 0.25,
) -> int | None:
    """The index of the box in ``boxes`` that continues the person at ``ref`` after ``dt_s`` seconds.

    The best IoU if it reaches ``min_iou``; otherwise the box whose centre is nearest, among boxes
    of 0.5–2x the height whose centre is within ``(slack + max_speed * |dt_s|)`` reference heights
    (walking covers about one body height per second). None when nothing qualifies.

    Example:
        >>> boxes = np.array([[100, 0, 140, 100], [300, 0, 340, 100]], float)
        >>> match_box([110, 0, 150, 100], boxes, 0.1), match_box([160, 0, 200, 100], boxes, 0.3)
        (0, 0)
        >>> match_box([200, 0, 240, 100], boxes, 0.1) is None
        True
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    r = np.asarray(ref, np.float64)
    iou = box_iou(r, boxes)[0]
    best = int(np.argmax(iou))
    if iou[best] >= min_iou:
        return best
    h = max(r[3] - r[1], 1.0)
    heights = boxes[:, 3] - boxes[:, 1]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = np.hypot(*(centres - (r[:2] + r[2:]) / 2).T)
    ok = (dist <= h * (slack + max_speed * abs(dt_s))) & (heights >= 0.5 * h) & (heights <= 2.0 * h)
    if not ok.any():
        return None
    return int(np.flatnonzero(ok)[np.argmin(dist[ok])])


Probe = Literal["inside", "outside", "lost"]


class DetectorLookback:
    """:class:`Lookback` with the person detector: bisects the buffered frames (module doc).

    ``detect`` is the shared :class:`~daemon.detector.PersonDetector` (or any callable from a BGR
    image to :class:`~daemon.records.Detections`). The expected time of a step is the slowest of
    the last ``recent_runs`` detector runs, the live ones included (:meth:`detector_ran`), waits
    for the detector's lock (other cameras) included; the very first run (model warm-up, and
    other cameras' warm-up for the lock) only counts until there is another.
    """

    def __init__(
        self,
        detect: Callable[[np.ndarray], Detections],
        *,
        min_iou: float = 0.3,
        max_speed: float = 1.5,
        recent_runs: int = 8,
    ):
        self.detect = detect
        self.min_iou = min_iou
        self.max_speed = max_speed
        self._run_s: collections.deque[float] = collections.deque(maxlen=recent_runs)
        self._first_s: float | None = None

    def detector_ran(self, seconds: float) -> None:
        """Learn the detector's speed (the pipeline reports its live runs here)."""
        if self._first_s is None:
            self._first_s = seconds
        else:
            self._run_s.append(seconds)

    @property
    def expected_step_s(self) -> float:
        """Seconds one probe is expected to take (0 before any run was seen)."""
        return max(self._run_s, default=self._first_s or 0.0)

    def _probe(self, frame: BufferedFrame, ref: Sighting, zone: Zone) -> tuple[Probe, Sighting | None]:
        t0 = time.perf_counter()
        image = frame.decode()
        det = self.detect(image)
        self.detector_ran(time.perf_counter() - t0)
        i = match_box(ref.bbox, det.xyxy, ref.pts_s - frame.pts_s, min_iou=self.min_iou, max_speed=self.max_speed)
        if i is None:
            return "lost", None
        person = TrackedPerson(-1, det.xyxy[i].astype(np.float64), float(det.confidence[i]))
        anchors = zone.anchor_points((person,))
        height, width = image.shape[:2]
        inside = bool(zone.test((person,), anchors, width, height)[0])
        seen = Sighting(
            frame.index, frame.pts_s, frame.wall_time, tuple(float(v) for v in person.bbox),
            (float(anchors[0, 0]), float(anchors[0, 1])), person.score,
        )
        return ("inside" if inside else "outside"), seen

    def find_entry(self, query: EntryQuery, frames: Sequence[BufferedFrame], deadline: Deadline) -> LookbackResult:
        if query.zone.anchor == "mask_overlap":
            return LookbackResult(query.detected, UNSUPPORTED)
        frames = [f for f in frames if f.index < query.detected.index]
        indices = [f.index for f in frames]
        hi, hi_pos = query.detected, len(frames)  # earliest frame known inside, and its position
        lo_pos = bisect.bisect_right(indices, query.since_index) - 1  # latest frame taken as not inside
        lo_checked, lo_state = query.since_seen, "outside"
        span = max(hi_pos - lo_pos, 2)  # how far to jump back when the person was inside at lo
        probes = 0
        if query.since_seen and (lo_pos < 0 or indices[lo_pos] != query.since_index):
            lo_checked = False  # the tracker's sighting is no longer buffered: verify another frame
        while True:
            while hi_pos - lo_pos > 1:
                m = (lo_pos + hi_pos) // 2
                if not deadline.allows(self.expected_step_s):
                    return LookbackResult(hi, BUDGET_EXCEEDED, probes)
                state, seen = self._probe(frames[m], hi, query.zone)
                probes += 1
                if state == "inside":
                    hi, hi_pos = seen, m
                else:
                    lo_pos, lo_state, lo_checked = m, state, True
            if lo_checked:
                return LookbackResult(hi, YES if lo_state == "outside" else PERSON_LOST, probes)
            if lo_pos < 0:
                return LookbackResult(hi, BUFFER_TOO_SHORT, probes)
            # Nobody saw the person at lo (the detector missed them, or their track was not
            # confirmed yet): look at it, and go further back if they were already inside.
            if not deadline.allows(self.expected_step_s):
                return LookbackResult(hi, BUDGET_EXCEEDED, probes)
            state, seen = self._probe(frames[lo_pos], hi, query.zone)
            probes += 1
            if state != "inside":
                return LookbackResult(hi, YES if state == "outside" else PERSON_LOST, probes)
            hi, hi_pos = seen, lo_pos
            lo_pos = max(lo_pos - span, -1)


@dataclass(slots=True)
class RefineStats:
    """Running totals of one camera's refiner (for tests and benchmarks)."""

    entries: int = 0
    refined_earlier: int = 0
    probes: int = 0
    budget_exceeded: int = 0
    max_batch_s: float = 0.0
    by_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class EntryRefiner:
    """Refines one camera's entry transitions (module doc).

    Feed it what the pipeline sees: :meth:`detector_ran` for every detector run, :meth:`observe`
    for every tracker update; pass every batch of transitions through :meth:`process` before
    emitting them. ``on_budget_exceeded`` is called once per refinement the budget stopped.
    """

    def __init__(
        self,
        camera: str,
        buffer: FrameBuffer,
        zones: Sequence[Zone],
        lookback: Lookback | None,
        *,
        enabled: bool = True,
        budget_s: float = 0.5,
        on_budget_exceeded: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        keep: int = 4096,
    ):
        self.camera = camera
        self.buffer = buffer
        self.zones = {z.id: z for z in zones}
        self.lookback = lookback
        self.enabled = enabled and lookback is not None
        if self.enabled:  # the lookback reads frames back to the previous detector run: keep them all
            buffer.keep_history()
        self.budget_s = budget_s
        self._on_budget_exceeded = on_budget_exceeded or (lambda: None)
        self._clock = clock
        self._detector_frames: collections.deque[int] = collections.deque(maxlen=keep)
        self._seen: dict[int, collections.deque[int]] = {}
        self._keep = keep
        self._entries: dict[tuple[int, str], float] = {}  # (track, region) -> refined entry pts
        self.stats = RefineStats()

    @classmethod
    def for_camera(
        cls,
        cfg: RefineConfig,
        camera: str,
        buffer: FrameBuffer,
        zones: Sequence[Zone],
        detect: Callable[[np.ndarray], Detections] | None,
        *,
        on_budget_exceeded: Callable[[], None] | None = None,
    ) -> EntryRefiner:
        """The refiner ``[refine]`` asks for, with the detector-based lookback."""
        lookback = DetectorLookback(detect) if detect is not None else None
        return cls(
            camera, buffer, zones, lookback, enabled=cfg.enabled, budget_s=cfg.budget_s,
            on_budget_exceeded=on_budget_exceeded,
        )

    # -- what the pipeline saw -------------------------------------------------------------
    def detector_ran(self, frame_index: int, seconds: float | None = None) -> None:
        """The detector ran on this frame (taking ``seconds``)."""
        if not self._detector_frames or frame_index > self._detector_frames[-1]:
            self._detector_frames.append(frame_index)
        if seconds is not None and hasattr(self.lookback, "detector_ran"):
            self.lookback.detector_ran(seconds)

    def observe(self, update: TrackUpdate) -> None:
        """A tracker update: remember on which frames each track was seen."""
        idx = update.frame.index
        for p in update.people:
            seen = self._seen.setdefault(p.track_id, collections.deque(maxlen=self._keep))
            if not seen or idx > seen[-1]:
                seen.append(idx)
        for track_id in update.ended:
            self._seen.pop(track_id, None)

    # -- transitions -----------------------------------------------------------------------
    def process(self, transitions: list[RegionTransition]) -> list[RegionTransition]:
        """Refine the entries, fix the exits' dwell; same order. One budget for the whole batch."""
        deadline: Deadline | None = None
        out = []
        for t in transitions:
            if t.type == "entry":
                if self.enabled and deadline is None:
                    deadline = Deadline(self.budget_s, clock=self._clock)
                t = self._refine(t, deadline)
                self._entries[(t.track_id, t.region)] = t.pts_s
            else:
                entered = self._entries.pop((t.track_id, t.region), None)
                if entered is not None and t.dwell_s is not None:
                    t = dataclasses.replace(t, dwell_s=max(0.0, t.pts_s - entered))
            out.append(t)
        if deadline is not None:
            self.stats.max_batch_s = max(self.stats.max_batch_s, deadline.elapsed())
        return out

    def _since(self, track_id: int, index: int) -> tuple[int, bool]:
        """The last frame before ``index`` where the person was known not inside (see EntryQuery)."""
        seen = self._seen.get(track_id, ())
        k = bisect.bisect_left(seen, index)
        last_seen = seen[k - 1] if k > 0 else -1
        k = bisect.bisect_left(self._detector_frames, index)
        last_run = self._detector_frames[k - 1] if k > 0 else -1
        if last_seen >= 0 and last_seen >= last_run:
            return last_seen, True
        return last_run, False

    def _refine(self, t: RegionTransition, deadline: Deadline | None) -> RegionTransition:
        if not self.enabled or deadline is None:
            return dataclasses.replace(t, detected_frame=t.frame, refined=DISABLED)
        zone = self.zones.get(t.region)
        detected = Sighting.of_transition(t)
        since, since_seen = self._since(t.track_id, t.frame)
        query = EntryQuery(self.camera, zone, t.track_id, detected, since, since_seen)
        try:
            if since_seen and since == t.frame - 1:
                result = LookbackResult(detected, YES)  # the tracker saw them outside on the frame before
            else:
                frames = [f for f in self.buffer.history(-1) if f.index < t.frame]
                result = self.lookback.find_entry(query, frames, deadline)
        except Exception:
            log.exception("camera %s: entry refinement failed for track %d", self.camera, t.track_id)
            result = LookbackResult(detected, FAILED)
        self.stats.entries += 1
        self.stats.probes += result.probes
        self.stats.by_status[result.status] += 1
        if result.status == BUDGET_EXCEEDED:
            self.stats.budget_exceeded += 1
            self._on_budget_exceeded()
        e = result.entry
        if e.index != t.frame:
            self.stats.refined_earlier += 1
        log.debug(
            "camera %s: track %d entered %s at frame %d (detected %d, %s, %d probes, %.3f s)",
            self.camera, t.track_id, t.region, e.index, t.frame, result.status, result.probes, deadline.elapsed(),
        )
        return dataclasses.replace(
            t,
            frame=e.index,
            pts_s=e.pts_s,
            wall_time=e.wall_time,
            bbox=e.bbox,
            anchor=e.anchor,
            score=e.score,
            mask_bbox=e.mask_bbox,
            mask_polygon=e.mask_polygon,
            detected_frame=t.frame,
            refined=result.status,
        )


__all__ = [
    "BUDGET_EXCEEDED",
    "BUFFER_TOO_SHORT",
    "DISABLED",
    "FAILED",
    "PERSON_LOST",
    "UNSUPPORTED",
    "YES",
    "Deadline",
    "DetectorLookback",
    "EntryQuery",
    "EntryRefiner",
    "Lookback",
    "LookbackResult",
    "RefineStats",
    "Sighting",
    "match_box",
]
