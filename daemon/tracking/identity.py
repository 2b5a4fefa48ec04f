"""One identity per person through occlusions and crossings, for every tracker backend.

Trackers lose people: behind a lamp post, when two walkers cross, when the detector misses them
for a moment. The tracker then ends the track and starts a new one when the person shows up again,
and region logic would report a false exit and a false entry. :class:`IdentityKeeper` sits between
the tracker and region logic and renames tracker ids to stable person ids:

* a person who vanishes (not reported, or ended by the tracker) stays *missing* for up to
  ``lost_after_s`` after their last sighting; only then is their end passed on;
* a new tracker track that appears where a missing person would be by now — their last box moved
  on at their last measured velocity, within a gate that widens with the time missing — and that
  looks alike (a colour histogram of the box, when both are known) continues that person's id.
  All new tracks of a frame are matched to all missing people at once (minimum total cost), so
  two people crossing are not both given to the nearer one.

A continued track is confirmed at once: the detector has seen this person before.

Example: person 7 walks right at 10 px per frame, vanishes for 5 frames behind something and comes
back as tracker id 8 near where they would be; then the tracker ends 8 and no one comes back.
    >>> import numpy as np
    >>> from daemon.records import Frame, TrackedPerson, TrackUpdate
    >>> img = np.zeros((200, 400, 3), np.uint8)
    >>> keeper = IdentityKeeper(lost_after_s=1.0)
    >>> def step(i, people=(), ended=()):
    ...     u = keeper.update(TrackUpdate(Frame("c", i, i / 10, i / 10, img), tuple(people), ended))
    ...     return [p.track_id for p in u.people], list(u.ended)
    >>> walker = lambda tid, i: TrackedPerson(tid, np.array([10 * i, 50, 10 * i + 30, 130], np.float32), 0.9)
    >>> [step(i, [walker(7, i)]) for i in range(3)][-1]
    ([1], [])
    >>> step(3, ended=(7,)), step(8, [walker(8, 8)])
    (([], []), ([1], []))
    >>> step(9, ended=(8,)), step(17), step(19)
    (([], []), ([], []), ([], [1]))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

from daemon.geometry import assign, box_iou
from daemon.records import TrackedPerson, TrackUpdate


def appearance(image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """A normalised hue–saturation histogram of the middle of a box (None if it is off-frame)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    # Middle 60 % of the width, 10–90 % of the height: clothes, not the background beside them.
    xa, xb = int(max(0, x1 + 0.2 * bw)), int(min(w, x2 - 0.2 * bw))
    ya, yb = int(max(0, y1 + 0.1 * bh)), int(min(h, y2 - 0.1 * bh))
    if xb - xa < 2 or yb - ya < 4:
        return None
    hsv = cv2.cvtColor(image[ya:yb, xa:xb], cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1).reshape(-1)


@dataclass(slots=True)
class _Person:
    id: int
    tracker_id: int | None
    box: np.ndarray
    pts: float  # last sighting, stream seconds
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre, px/s
    looks: np.ndarray | None = None
    looks_pts: float = float("-inf")
    confirmed: bool = False

    def predicted(self, pts: float) -> np.ndarray:
        dt = min(pts - self.pts, 2.0)  # people turn and stop: extrapolate a short way only
        return self.box + np.tile(self.velocity * dt, 2)


class IdentityKeeper:
    """Stable person ids over a tracker's ids (module doc). One per camera.

    ``gate`` bounds how far (in box heights, plus ``gate_per_s`` per second missing) a new track
    may start from a missing person's predicted box; ``max_colour_distance`` is the largest
    Bhattacharyya distance between their colour histograms for them to be the same person.
    """

    def __init__(
        self,
        lost_after_s: float = 2.0,
        *,
        gate: float = 0.5,
        gate_per_s: float = 0.6,
        max_colour_distance: float = 0.75,
        colour_every_s: float = 0.25,
        first_id: int = 1,
    ):
        self.lost_after_s = lost_after_s
        self.gate = gate
        self.gate_per_s = gate_per_s
        self.max_colour_distance = max_colour_distance
        self.colour_every_s = colour_every_s
        self._people: dict[int, _Person] = {}
        self._by_tracker: dict[int, int] = {}
        self._next_id = first_id

    @property
    def active(self) -> int:
        return len(self._people)

    @property
    def next_id(self) -> int:
        """The id the next new person gets."""
        return self._next_id

    def update(self, update: TrackUpdate) -> TrackUpdate:
        frame = update.frame
        now = frame.pts_s
        for tid in update.ended:
            pid = self._by_tracker.pop(tid, None)
            person = self._people.get(pid) if pid is not None else None
            if person is not None and person.tracker_id == tid:
                person.tracker_id = None  # missing: its end waits for lost_after_s
        known = [p for p in update.people if p.track_id in self._by_tracker]
        new = [p for p in update.people if p.track_id not in self._by_tracker]
        present = {self._by_tracker[p.track_id] for p in known}
        self._continue(new, now, frame.image, present)
        out: list[TrackedPerson] = []
        for p in update.people:
            person = self._people[self._by_tracker[p.track_id]]
            self._observe(person, p, now, frame.image, update.people)
            person.confirmed = person.confirmed or p.confirmed
            out.append(dataclasses.replace(p, track_id=person.id, confirmed=person.confirmed))
        ended = []
        seen = {q.track_id for q in out}
        for pid, person in list(self._people.items()):
            unconfirmed_gone = person.tracker_id is None and not person.confirmed
            if unconfirmed_gone or (pid not in seen and now - person.pts > self.lost_after_s):
                ended.append(pid)
                self._forget(person)
        return TrackUpdate(frame, tuple(sorted(out, key=lambda q: q.track_id)), tuple(sorted(ended)))

    def finish(self, update: TrackUpdate | None) -> TrackUpdate | None:
        """End of stream: pass the tracker's last update through, then end everyone."""
        if update is None:
            return None
        last = self.update(update)
        ended = tuple(sorted(set(last.ended) | set(self._people)))
        for person in list(self._people.values()):
            self._forget(person)
        return TrackUpdate(update.frame, last.people, ended) if ended or last.people else None

    def _forget(self, person: _Person) -> None:
        del self._people[person.id]
        if person.tracker_id is not None:
            self._by_tracker.pop(person.tracker_id, None)

    def _continue(self, new: list[TrackedPerson], now: float, image: np.ndarray, present: set[int]) -> None:
        """Give each new tracker track a missing person's id, or a new one."""
        missing = [
            q for q in self._people.values()
            if q.id not in present and q.confirmed and now - q.pts <= self.lost_after_s
        ]
        pairs: list[tuple[int, int]] = []
        if new and missing:
            cost = np.full((len(new), len(missing)), np.inf)
            looks_new: dict[int, np.ndarray | None] = {}
            for j, q in enumerate(missing):
                pred = q.predicted(now)
                height = max(pred[3] - pred[1], 1.0)
                allowed = self.gate + self.gate_per_s * (now - q.pts)
                centre = (pred[:2] + pred[2:]) / 2
                for i, p in enumerate(new):
                    b = np.asarray(p.bbox, np.float64)
                    dist = np.linalg.norm((b[:2] + b[2:]) / 2 - centre) / height
                    ratio = (b[3] - b[1]) / height
                    if dist > allowed or not 0.6 <= ratio <= 1.6:  # partly hidden behind something: still them
                        continue
                    colour = 0.0
                    if q.looks is not None:
                        if i not in looks_new:
                            looks_new[i] = appearance(image, b)
                        looks = looks_new[i]
                        if looks is not None:
                            colour = cv2.compareHist(q.looks, looks, cv2.HISTCMP_BHATTACHARYYA)
                            if colour > self.max_colour_distance:
                                continue
                    cost[i, j] = dist / allowed + colour
            pairs = assign(np.where(np.isfinite(cost), cost, 1e6), limit=1e5)
        taken = {i: missing[j] for i, j in pairs}
        for i, p in enumerate(new):
            person = taken.get(i)
            if person is None:
                person = _Person(self._next_id, None, np.asarray(p.bbox, np.float64), now)
                self._people[person.id] = person
                self._next_id += 1
            elif person.tracker_id is not None:  # still alive in the tracker, but unseen: retire that id
                self._by_tracker.pop(person.tracker_id, None)
            person.tracker_id = p.track_id
            self._by_tracker[p.track_id] = person.id

    def _observe(self, person: _Person, p: TrackedPerson, now: float, image: np.ndarray, everyone) -> None:
        box = np.asarray(p.bbox, np.float64)
        dt = now - person.pts
        if dt > 0:
            v = ((box[:2] + box[2:]) - (person.box[:2] + person.box[2:])) / 2 / dt
            # Smoothed over ~3 sightings: one jumpy box (a detection after following) barely moves it.
            person.velocity = v if not person.velocity.any() else 0.7 * person.velocity + 0.3 * v
        person.box, person.pts = box, now
        if now - person.looks_pts >= self.colour_every_s and p.confirmed:
            # Only while nobody overlaps them: a histogram of two people describes neither.
            others = [q.bbox for q in everyone if q is not p]
            if not others or box_iou(box, np.array(others)).max() < 0.1:
                looks = appearance(image, box)
                if looks is not None:
                    person.looks = looks if person.looks is None else 0.8 * person.looks + 0.2 * looks
                    person.looks_pts = now
