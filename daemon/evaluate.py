"""Scoring a deployment on labelled footage: MOT metrics and region-event precision / recall.

``regionwatch evaluate`` (see :mod:`daemon.cli`) runs the real pipeline on a file camera and
compares what it saw with ground-truth boxes in MOTChallenge format (``frame, id, left, top,
width, height, flag, ...``, 1-based frames; rows with flag 0 are "ignore" regions, as in the MOT15
devkit). Two views:

* **Tracking** (py-motmetrics): MOTA, IDF1, ID switches, box precision / recall at IoU ≥ 0.5.
  On a frame where the tracker reported nothing new, its latest reported positions count — that
  is what region logic saw.
* **Region events**: the ground-truth boxes go through the same :class:`~daemon.regions.RegionLogic`
  (same regions, anchors and debounce; a ground-truth track that disappears ends), which gives the
  events a perfect tracker would produce. Predicted and true events of the same region and type
  are paired one-to-one, closest frames first, within ``tolerance_frames``; precision, recall and
  the median frame error of the pairs follow.

Example: two ground-truth people, one walks through the region; the "prediction" is the truth.
    >>> import numpy as np
    >>> from daemon.config import RegionConfig
    >>> rows = [(f, 1, 10 + 10 * f, 10, 20, 40) for f in range(1, 11)] + [(f, 2, 150, 10, 20, 40) for f in range(1, 4)]
    >>> gt = MotTable.from_rows(rows)
    >>> region = RegionConfig(id="mid", polygon=[[50, 0], [100, 0], [100, 100], [50, 100]])
    >>> truth = gt_transitions(gt, [region], camera="cam", fps=10, size=(200, 100), debounce_s=0.0)
    >>> [(t.type, t.frame, t.track_id) for t in truth]
    [('entry', 2, 1), ('exit', 8, 1)]
    >>> score = match_events(truth, truth, tolerance_frames=3)
    >>> score["entry"].precision, score["exit"].recall, score["all"].median_error
    (1.0, 1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.config import RegionConfig, Settings
from daemon.events import Event, RegionTransition
from daemon.geometry import assign
from daemon.records import Frame, TrackedPerson, TrackUpdate
from daemon.regions import RegionLogic
from daemon.sinks.base import Sink


class GroundTruthError(ValueError):
    """A ground-truth file could not be read (the message names the file and line)."""


@dataclass(frozen=True, slots=True)
class MotBoxes:
    """Boxes on one frame: ids (N,), xyxy (N,4) and whether each is an "ignore" box (flag 0)."""

    ids: np.ndarray
    xyxy: np.ndarray
    ignore: np.ndarray

    @classmethod
    def empty(cls) -> MotBoxes:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, bool))


@dataclass(frozen=True)
class MotTable:
    """MOTChallenge boxes keyed by 0-based video frame index (file frame ``g`` is index ``g - 1``)."""

    frames: dict[int, MotBoxes]

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[float]]) -> MotTable:
        """Rows of ``frame(1-based), id, left, top, width, height[, flag]``."""
        by_frame: dict[int, list[Sequence[float]]] = {}
        for r in rows:
            by_frame.setdefault(int(r[0]) - 1, []).append(r)
        frames = {}
        for f, rs in by_frame.items():
            a = np.array([list(r[:6]) + [r[6] if len(r) > 6 else 1] for r in rs], np.float64)
            xyxy = np.column_stack([a[:, 2], a[:, 3], a[:, 2] + a[:, 4], a[:, 3] + a[:, 5]])
            frames[f] = MotBoxes(a[:, 1].astype(np.int64), xyxy, a[:, 6] == 0)
        return cls(frames)

    @classmethod
    def load(cls, path: str | Path) -> MotTable:
        """Read a MOTChallenge ``gt.txt`` / tracker output file (comma separated, 1-based frames)."""
        rows = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GroundTruthError(f"cannot read ground truth {path}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                values = [float(v) for v in line.replace(" ", "").split(",")]
            except ValueError:
                raise GroundTruthError(f"{path}:{n}: not a comma-separated list of numbers: {line[:80]!r}") from None
            if len(values) < 6:
                raise GroundTruthError(f"{path}:{n}: needs at least 6 columns (frame,id,left,top,width,height)")
            if values[0] < 1 or values[0] != int(values[0]):
                raise GroundTruthError(f"{path}:{n}: frame numbers are 1-based integers, got {values[0]:g}")
            if not all(math.isfinite(v) for v in values[:6]) or values[4] <= 0 or values[5] <= 0:
                raise GroundTruthError(f"{path}:{n}: box must be finite with positive width and height")
            rows.append(values)
        if not rows:
            raise GroundTruthError(f"{path}: no boxes")
        return cls.from_rows(rows)

    def get(self, index: int) -> MotBoxes:
        return self.frames.get(index, MotBoxes.empty())

    @property
    def last_index(self) -> int:
        return max(self.frames)


def gt_updates(gt: MotTable, *, camera: str, fps: float, size: tuple[int, int], frames: int | None = None):
    """The ground truth as the tracker updates a perfect tracker would give (flag-0 boxes left out).

    A track that is absent on a frame ends on that frame; every track still present after the last
    frame ends with :meth:`RegionLogic.finish`, as the pipeline's do at the end of a file.
    """
    blank = np.zeros((size[1], size[0], 3), np.uint8)  # region logic reads only the frame's size
    last = (frames - 1) if frames is not None else gt.last_index
    alive: set[int] = set()
    for index in range(last + 1):
        boxes = gt.get(index)
        keep = ~boxes.ignore
        ids = [int(i) for i in boxes.ids[keep]]
        people = tuple(TrackedPerson(i, b.astype(np.float32), 1.0) for i, b in zip(ids, boxes.xyxy[keep]))
        ended = tuple(sorted(alive - set(ids)))
        alive = set(ids)
        yield TrackUpdate(Frame(camera, index, index / fps, index / fps, blank), people, ended)


def gt_transitions(
    gt: MotTable,
    regions: Sequence[RegionConfig],
    *,
    camera: str,
    fps: float,
    size: tuple[int, int],
    debounce_s: float,
    frames: int | None = None,
) -> list[RegionTransition]:
    """Region events of the ground-truth tracks (module doc)."""
    logic = RegionLogic(camera, list(regions), debounce_s=debounce_s)
    out: list[RegionTransition] = []
    for update in gt_updates(gt, camera=camera, fps=fps, size=size, frames=frames):
        out.extend(logic.update(update))
    out.extend(logic.finish())
    return out


@dataclass(frozen=True)
class EventScore:
    """Matched (tp), spurious (fp) and missed (fn) events; ``errors`` are |frame error| of the pairs."""

    tp: int
    fp: int
    fn: int
    errors: tuple[int, ...] = field(default=())

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def median_error(self) -> float | None:
        return float(np.median(self.errors)) if self.errors else None

    def __add__(self, other: EventScore) -> EventScore:
        return EventScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.errors + other.errors)

    def to_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "median_frame_error": self.median_error}


def match_events(
    predicted: Sequence[RegionTransition | Event], truth: Sequence[RegionTransition], *, tolerance_frames: int
) -> dict[str, EventScore]:
    """Pair events (anything with ``region``, ``type`` and ``frame``) of the same region and type
    one-to-one, within ``tolerance_frames``.

    The pairing minimises the total frame error (Hungarian assignment), so a late event is not
    stolen by an unrelated one. Returns scores for ``"entry"``, ``"exit"`` and ``"all"``.
    """
    scores = {"entry": EventScore(0, 0, 0), "exit": EventScore(0, 0, 0)}
    keys = {(t.region, t.type) for t in [*predicted, *truth]}
    for region, kind in sorted(keys):
        p = np.array([t.frame for t in predicted if t.region == region and t.type == kind], np.int64)
        g = np.array([t.frame for t in truth if t.region == region and t.type == kind], np.int64)
        errors: list[int] = []
        if len(p) and len(g):
            diff = np.abs(p[:, None] - g[None, :])
            errors = [int(diff[r, c]) for r, c in assign(diff, limit=tolerance_frames + 0.5)]
        tp = len(errors)
        scores[kind] = scores[kind] + EventScore(tp, len(p) - tp, len(g) - tp, tuple(errors))
    scores["all"] = scores["entry"] + scores["exit"]
    return scores


@dataclass(frozen=True)
class MotSummary:
    """The py-motmetrics figures reported by ``evaluate``."""

    mota: float
    idf1: float
    id_switches: int
    precision: float
    recall: float
    frames: int

    def to_dict(self) -> dict:
        return {"mota": round(self.mota, 4), "idf1": round(self.idf1, 4), "id_switches": self.id_switches,
                "precision": round(self.precision, 4), "recall": round(self.recall, 4), "frames": self.frames}


def mot_summary(gt: MotTable, hypotheses: dict[int, tuple[np.ndarray, np.ndarray]], frames: int) -> MotSummary:
    """MOT metrics over frames ``0 .. frames-1``; ``hypotheses[index] = (ids, xyxy)``.

    Hypotheses that overlap a flag-0 ("ignore") ground-truth box by IoU ≥ 0.5 are dropped first,
    as MOTChallenge does for distractors.
    """
    import motmetrics as mm

    from daemon.geometry import box_iou

    acc = mm.MOTAccumulator(auto_id=False)
    for index in range(frames):
        g = gt.get(index)
        ids, boxes = hypotheses.get(index, (np.zeros(0, np.int64), np.zeros((0, 4))))
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if g.ignore.any() and len(boxes):
            near_ignored = (box_iou(boxes, g.xyxy[g.ignore]) >= 0.5).any(axis=1)
            ids, boxes = np.asarray(ids)[~near_ignored], boxes[~near_ignored]
        keep = ~g.ignore
        # py-motmetrics' own iou_matrix uses np.asfarray, gone in NumPy 2: the same distances here
        # (1 - IoU, NaN = "cannot match" beyond 0.5).
        dist = 1.0 - box_iou(g.xyxy[keep], boxes)
        dist[dist > 0.5] = np.nan
        acc.update(list(g.ids[keep]), [int(i) for i in ids], dist, frameid=index)
    mh = mm.metrics.create()
    s = mh.compute(acc, metrics=["mota", "idf1", "num_switches", "precision", "recall"], name="run")
    row = s.loc["run"]
    return MotSummary(float(row["mota"]), float(row["idf1"]), int(row["num_switches"]),
                      float(row["precision"]), float(row["recall"]), frames)


class HypothesisRecorder:
    """Collects what region logic saw, per frame, from the pipeline's tracker updates.

    A frame without an update keeps the previous update's people (the tracker did not look).
    """

    def __init__(self):
        self.by_frame: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._current: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros((0, 4)))

    def __call__(self, frame: Frame, update: TrackUpdate | None, _transitions=None) -> None:
        if update is not None:
            people = update.people
            self._current = (
                np.array([p.track_id for p in people], np.int64),
                np.array([p.bbox for p in people], np.float64).reshape(-1, 4),
            )
        self.by_frame[frame.index] = self._current


class _Collector(Sink):
    """An in-memory sink: the events of an evaluation run."""

    name = "evaluate"

    def __init__(self):
        self.events: list[Event] = []

    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        self.events.append(event)


@dataclass(frozen=True)
class EvaluationReport:
    """What ``regionwatch evaluate`` prints (as a table, or as JSON with ``to_dict``)."""

    camera: str
    frames: int
    fps: float
    tracking: MotSummary
    events: dict[str, EventScore]
    true_events: int
    predicted_events: int
    tolerance_frames: int
    cpu_s: float
    detector_runs: int

    @property
    def video_s(self) -> float:
        return self.frames / self.fps

    def to_dict(self) -> dict:
        return {
            "camera": self.camera, "frames": self.frames, "fps": round(self.fps, 3),
            "tracking": self.tracking.to_dict(),
            "events": {k: v.to_dict() for k, v in self.events.items()},
            "true_events": self.true_events, "predicted_events": self.predicted_events,
            "tolerance_frames": self.tolerance_frames,
            "cpu_s": round(self.cpu_s, 2), "cpu_s_per_video_s": round(self.cpu_s / self.video_s, 3),
            "detector_runs": self.detector_runs,
        }

    def table(self) -> str:
        t = self.tracking
        lines = [
            f"camera {self.camera}: {self.frames} frames ({self.video_s:.1f} s of video at {self.fps:g} fps)",
            f"tracking  MOTA {t.mota:.3f}  IDF1 {t.idf1:.3f}  ID switches {t.id_switches}  "
            f"box precision {t.precision:.3f}  recall {t.recall:.3f}",
            f"events    {'type':<6} {'matched':>7} {'spurious':>8} {'missed':>6} {'precision':>9} {'recall':>6}  "
            f"median error (frames, within {self.tolerance_frames})",
        ]
        for kind in ("entry", "exit", "all"):
            e = self.events[kind]
            err = "-" if e.median_error is None else f"{e.median_error:g}"
            lines.append(f"          {kind:<6} {e.tp:>7} {e.fp:>8} {e.fn:>6} {e.precision:>9.3f} {e.recall:>6.3f}  {err}")
        lines.append(f"cost      {self.cpu_s:.1f} CPU s ({self.cpu_s / self.video_s:.2f} per second of video), "
                     f"{self.detector_runs} detector runs ({self.detector_runs / max(self.frames, 1):.0%} of frames)")
        return "\n".join(lines)


def evaluate(settings: Settings, camera_id: str | None, ground_truth: str | Path, *, tolerance_s: float = 1.0,
             gt: MotTable | None = None) -> EvaluationReport:
    """Run the daemon's pipeline on a file camera and score it against MOT ground truth (module doc).

    Raises :class:`~daemon.jobs.JobError` for a camera that cannot be evaluated and
    :class:`GroundTruthError` for an unreadable ground-truth file.
    """
    import tempfile
    import time

    from daemon.app import App
    from daemon.jobs import JobError, VideoInfo, file_camera_settings

    gt = gt or MotTable.load(ground_truth)
    with tempfile.TemporaryDirectory(prefix="regionwatch-evaluate-") as state_dir:
        s = file_camera_settings(settings, camera_id, state_dir, job="evaluate")
        cam = s.cameras[0]
        try:
            info = VideoInfo.probe(cam.url.removeprefix("file://"))
        except Exception as e:  # PyAV raises many kinds
            raise JobError(f"cannot read video {cam.url}: {e}") from None
        fps = float(info.rate)
        app = App(s)
        collector = _Collector()
        recorder = HypothesisRecorder()
        try:
            app.load()
            app.sinks.append(collector)
            pipeline = app.pipelines[0]
            pipeline.observers.append(recorder)
            cpu0 = time.process_time()
            code = app.run()
            cpu = time.process_time() - cpu0
        except BaseException:
            app.shutdown()  # the state lock and anything loaded are released before the folder goes
            raise
        if code != 0:
            raise JobError(f"the run on camera {cam.id} failed (exit code {code}); see the log above")
    frames = pipeline.frames
    truth = gt_transitions(gt, cam.regions, camera=cam.id, fps=fps, size=(info.width, info.height),
                           debounce_s=s.events.debounce_s, frames=frames)
    tolerance = max(1, round(tolerance_s * fps))
    return EvaluationReport(
        camera=cam.id, frames=frames, fps=fps,
        tracking=mot_summary(gt, recorder.by_frame, frames),
        events=match_events(collector.events, truth, tolerance_frames=tolerance),
        true_events=len(truth), predicted_events=len(collector.events), tolerance_frames=tolerance,
        cpu_s=cpu, detector_runs=pipeline.detector_runs,
    )
