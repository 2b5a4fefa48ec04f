"""SAM2 tracker backend: YOLO detections seed people; a streaming SAM2 session follows their masks.

Per camera, a :class:`~daemon.tracking.sam2_session.StreamingSam2Session` steps every person
together at ``track_fps`` (stream time) and on every detector frame. A detection whose box
matches no tracked person's mask box (IoU < ``match_iou``) becomes a new person, prompted with
the box (or the notebook's points). A person whose SAM2 object score stays negative for
``lost_after_s`` ends. The model is loaded once and shared by all cameras (one step at a time).

Example (random weights — mechanics only):
    >>> import numpy as np
    >>> from daemon.config import Sam2Config
    >>> from daemon.records import Detections, Frame
    >>> cfg = Sam2Config(device="cpu", image_size=256, random_weights_for_tests=True)
    >>> tracker = Sam2Tracker(load_sam2_model(cfg), cfg, lost_after_s=2.0, camera="hall")
    >>> f = Frame("hall", 0, 0.0, 0.0, np.zeros((120, 160, 3), np.uint8))
    >>> u = tracker.update(f, Detections(np.array([[40, 20, 100, 110]], np.float32), np.array([0.9], np.float32)))
    >>> tracker.active, all(p.mask.shape == (120, 160) for p in u.people)
    (1, True)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.config import Sam2Config
from daemon.geometry import box_iou
from daemon.records import Detections, Frame, TrackedPerson, TrackUpdate

log = logging.getLogger(__name__)


class Sam2LoadError(RuntimeError):
    """The SAM2 model could not be built or its checkpoint loaded."""


@dataclass
class Sam2Model:
    """The SAM2 model shared by every camera's session, with the lock that serialises its use."""

    predictor: object
    cfg: Sam2Config
    lock: threading.Lock
    autocast_dtype: object | None


def load_sam2_model(cfg: Sam2Config) -> Sam2Model:
    """Build SAM2 from ``model_config`` and load ``checkpoint`` (random weights only for tests)."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    if cfg.random_weights_for_tests:
        log.warning(
            "!!! tracker.sam2.random_weights_for_tests is set: SAM2 runs with RANDOM WEIGHTS. "
            "Masks are meaningless. Never use this outside tests. !!!"
        )
        ckpt = None
    else:
        if not cfg.checkpoint or not Path(cfg.checkpoint).is_file():
            raise Sam2LoadError(
                f"tracker.sam2.checkpoint: SAM2 checkpoint not found: {cfg.checkpoint or '(not set)'} "
                "— download it on a connected machine (see README 'Models and weights')"
            )
        ckpt = cfg.checkpoint
    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Sam2LoadError(f"tracker.sam2.device: {device} requested but CUDA is not available")
    overrides = [] if cfg.image_size == 1024 else [f"++model.image_size={cfg.image_size}"]
    try:
        predictor = build_sam2_video_predictor(
            cfg.model_config_name,
            ckpt_path=ckpt,
            device=device,
            hydra_overrides_extra=overrides,
            # Hole filling needs sam2's CUDA extension; on CPU it would only log an error.
            apply_postprocessing=device.startswith("cuda"),
        )
    except Exception as e:  # hydra / torch.load raise many kinds
        raise Sam2LoadError(f"tracker.sam2: cannot build {cfg.model_config_name} from {ckpt}: {e}") from e
    if cfg.compile:
        predictor.image_encoder.forward = torch.compile(predictor.image_encoder.forward, dynamic=False)
    autocast = torch.bfloat16 if cfg.bf16 and device.startswith("cuda") else None
    return Sam2Model(predictor, cfg, threading.Lock(), autocast)


@dataclass(slots=True)
class _Person:
    last_present_pts: float
    score: float
    det_box: np.ndarray  # the last detector box matched to (or prompting) this person
    mask_box: np.ndarray | None = None


class Sam2Tracker:
    """Per-camera SAM2 tracker implementing :class:`daemon.tracking.base.Tracker`."""

    def __init__(self, model: Sam2Model, cfg: Sam2Config, *, lost_after_s: float = 2.0, camera: str = ""):
        from daemon.tracking.sam2_session import StreamingSam2Session

        self.model = model
        self.cfg = cfg
        self.camera = camera
        self.lost_after_s = lost_after_s
        self.session = StreamingSam2Session(
            model.predictor,
            max_cond_frames=cfg.max_cond_frames,
            autocast_dtype=model.autocast_dtype,
            max_people=cfg.max_people,
        )
        self._people: dict[int, _Person] = {}
        self._next_id = 1
        self._next_track_pts = float("-inf")
        self._det_score: dict[int, float] = {}
        self.skipped_full = 0

    @property
    def active(self) -> int:
        return len(self._people)

    def update(self, frame: Frame, detections: Detections | None) -> TrackUpdate | None:
        due = frame.pts_s + 1e-6 >= self._next_track_pts
        if not due and detections is None:
            return None
        self._next_track_pts = frame.pts_s + 1.0 / self.cfg.track_fps
        rgb = np.ascontiguousarray(frame.image[..., ::-1])
        with self.model.lock:
            outputs = self.session.step(rgb)
            if detections is not None and len(detections):
                outputs.update(self._add_new_people(frame, detections, outputs))
        people = []
        for tid, out in sorted(outputs.items()):
            st = self._people[tid]
            st.score = out.score
            if out.score > 0 and out.bbox is not None:
                st.last_present_pts = frame.pts_s
                st.mask_box = np.asarray(out.bbox, np.float32)
                people.append(TrackedPerson(tid, st.mask_box, self._det_score.get(tid, 0.0), out.mask))
        ended = tuple(
            sorted(t for t, st in self._people.items() if frame.pts_s - st.last_present_pts > self.lost_after_s)
        )
        for tid in ended:
            self._forget(tid)
        return TrackUpdate(frame, tuple(people), ended)

    def _prompt(self, tid: int, box: np.ndarray):
        if self.cfg.prompt == "points":
            from daemon.tracking.sam2_session import points_from_box

            pts, labels = points_from_box(box)
            return self.session.add_person(tid, points=pts, labels=labels)
        return self.session.add_person(tid, box=box)

    def _add_new_people(self, frame: Frame, detections: Detections, outputs) -> dict:
        """Match detections to people by IoU with their mask box or last detector box; prompt the rest."""
        ids = list(self._people)
        iou = np.zeros((len(detections), len(ids)))
        if ids:
            det_boxes = np.stack([self._people[t].det_box for t in ids])
            iou = box_iou(detections.xyxy, det_boxes)
            mask_boxes = [(k, outputs[t].bbox) for k, t in enumerate(ids)
                          if t in outputs and outputs[t].score > 0 and outputs[t].bbox is not None]
            if mask_boxes:
                cols = [k for k, _ in mask_boxes]
                iou[:, cols] = np.maximum(iou[:, cols], box_iou(detections.xyxy, np.array([b for _, b in mask_boxes])))
        changed = {}
        for i in np.argsort(-detections.confidence):
            box, conf = detections.xyxy[i].copy(), float(detections.confidence[i])
            k = int(iou[i].argmax()) if ids else -1
            if k >= 0 and iou[i, k] >= self.cfg.match_iou:
                tid = ids[k]
                iou[:, k] = -1  # one detection per person
                st = self._people[tid]
                st.det_box, st.last_present_pts = box, frame.pts_s  # the detector sees them
                self._det_score[tid] = conf
                if not (tid in outputs and outputs[tid].score > 0):  # SAM2 lost them: re-anchor
                    changed[tid] = self._prompt(tid, box)
                continue
            if len(self._people) >= self.cfg.max_people:
                self.skipped_full += 1
                log.warning("camera %s: max_people=%d reached, not tracking a new person", self.camera, self.cfg.max_people)
                break
            tid = self._next_id
            self._next_id += 1
            changed[tid] = self._prompt(tid, box)
            self._people[tid] = _Person(frame.pts_s, changed[tid].score, box)
            self._det_score[tid] = conf
        return changed

    def _forget(self, tid: int) -> None:
        del self._people[tid]
        self._det_score.pop(tid, None)
        with self.model.lock:
            self.session.remove_person(tid)

    def finish(self, frame: Frame | None) -> TrackUpdate | None:
        ended = tuple(sorted(self._people))
        for tid in ended:
            self._forget(tid)
        if frame is None or not ended:
            return None
        return TrackUpdate(frame, (), ended)
