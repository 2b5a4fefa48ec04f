"""SAM2 tracker backend: YOLO detections seed people; the SAM2 server follows their masks.

Policy lives here, per camera (:class:`Sam2Tracker`); compute lives in one
:class:`~daemon.tracking.sam2_server.Sam2Server` per device that serves every camera
(:func:`load_sam2_model` builds both; :func:`build_sam2_tracker` makes a camera's tracker).

Per camera, every person is stepped at ``track_fps`` (stream time) and on every detector frame.
On a detector frame:

* a detection matches the person whose mask box (or last detector box) it overlaps best
  (IoU >= ``match_iou``); an unmatched one becomes a new, *tentative* person, prompted with its box
  (or the notebook's points);
* a matched person is re-anchored (prompted again with the detector's box, which becomes their
  newest conditioning frame) when SAM2 lost them, when SAM2's mask box and the detector's box
  disagree (IoU < ``reanchor_iou``), or when their newest conditioning frame is older than
  ``max_cond_age_s`` (SAM2 keeps the ``max_cond_frames`` most recent ones);

and on every step:

* a tentative person is reported once SAM2 has seen them on ``confirm_steps`` steps after the
  prompt (or the detector found them again); one SAM2 loses first is dropped without an event;
* of two people whose mask boxes overlap by IoU >= ``duplicate_iou``, the younger is dropped;
* a person SAM2 has not seen for ``lost_after_s`` ends;
* a stream discontinuity (the frame index goes back, or stream time jumps by more than
  ``reset_gap_s`` between the frames the tracker sees) ends everyone and resets the camera's
  SAM2 state.

Reported people carry SAM2's object score (sigmoid of its logit) as ``score``, the mask box as
``bbox``, the mask, its footprint and its overlap with each of the camera's regions (the last two
computed on the device). New people beyond the camera's ``max_people`` or the server's
``max_people_total`` are not tracked (``regionwatch_sam2_people_rejected_total``).

Example (random weights — mechanics only):
    >>> import numpy as np
    >>> from daemon.config import Sam2Config
    >>> from daemon.records import Detections, Frame
    >>> cfg = Sam2Config(device="cpu", image_size=128, random_weights_for_tests=True, confirm_steps=0)
    >>> model = load_sam2_model(cfg)
    >>> tracker = Sam2Tracker(model, cfg, lost_after_s=2.0, camera="hall")
    >>> f = Frame("hall", 0, 0.0, 0.0, np.zeros((120, 160, 3), np.uint8))
    >>> u = tracker.update(f, Detections(np.array([[40, 20, 100, 110]], np.float32), np.array([0.9], np.float32)))
    >>> tracker.active, tracker.client.people       # reported once SAM2 sees them (random here)
    (1, (1,))
    >>> all(p.mask.shape == (120, 160) for p in u.people)
    True
    >>> model.server.close()
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.config import CameraConfig, Sam2Config, Settings
from daemon.geometry import box_iou
from daemon.records import Detections, Frame, TrackedPerson, TrackUpdate
from daemon.tracking.sam2_server import CameraResult, PersonResult, Prompt, RegionMasks, Sam2Server

__all__ = ["Sam2LoadError", "Sam2Model", "Sam2Tracker", "build_sam2_tracker", "load_sam2_model"]

log = logging.getLogger(__name__)


class Sam2LoadError(RuntimeError):
    """The SAM2 model could not be built or its checkpoint loaded."""


@dataclass
class Sam2Model:
    """The SAM2 model and the server that runs it for every camera."""

    predictor: object
    cfg: Sam2Config
    server: Sam2Server
    autocast_dtype: object | None


def load_sam2_model(cfg: Sam2Config, *, metrics=None) -> Sam2Model:
    """Build SAM2 from ``model_config``, load ``checkpoint`` (random weights only for tests) and
    start its server (one worker thread; ``metrics``: a :class:`daemon.ops.metrics.Metrics`)."""
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
    if device.startswith("cuda") and cfg.tf32:
        # Matmuls and convolutions outside bf16 autocast (e.g. fp32 runs) use TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.compile:
        # Fixed encoder batch buckets keep the compiled encoder to a few shapes.
        predictor.image_encoder.forward = torch.compile(predictor.image_encoder.forward, dynamic=False)
    autocast = torch.bfloat16 if cfg.bf16 and device.startswith("cuda") else None
    server = Sam2Server(
        predictor,
        max_people=cfg.max_people_total,
        max_cond_frames=cfg.max_cond_frames,
        autocast_dtype=autocast,
        encoder_batches=cfg.encoder_batches,
        max_batch=cfg.max_batch,
        metrics=metrics,
    )
    return Sam2Model(predictor, cfg, server, autocast)


def build_sam2_tracker(settings: Settings, camera: CameraConfig, shared: dict, *, metrics=None) -> Sam2Tracker:
    """A camera's SAM2 tracker; the model and server are built once into ``shared["sam2"]``.

    The server computes each person's overlap with the camera's regions on the device
    (``PersonResult.overlaps``, same rasterisation as :class:`daemon.regions.Zone`).
    """
    from daemon.regions import Zone

    t = settings.tracker
    if "sam2" not in shared:
        shared["sam2"] = load_sam2_model(t.sam2, metrics=metrics)
    zones = [Zone(r) for r in camera.regions]  # this tracker's own copies: rasterised in the server thread
    region_masks = (lambda width, height: np.stack([z.mask(width, height) for z in zones])) if zones else None
    return Sam2Tracker(
        shared["sam2"], t.sam2, lost_after_s=t.lost_after_s, camera=camera.id, region_masks=region_masks, metrics=metrics
    )


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-min(max(logit, -60.0), 60.0)))


@dataclass(slots=True)
class _Track:
    """What the policy knows about one person."""

    det_box: np.ndarray  # the last detector box matched to (or prompting) them
    last_present_pts: float
    born_pts: float  # stream time of their first prompt
    cond_pts: float  # stream time of their newest conditioning frame (prompt)
    confirmed: bool
    seen_steps: int = 0  # steps SAM2 saw them on since the prompt (tentative people)
    result: PersonResult | None = None  # this frame's SAM2 output


class Sam2Tracker:
    """Per-camera SAM2 tracker implementing :class:`daemon.tracking.base.Tracker`.

    Args:
        model: from :func:`load_sam2_model` (shared by all cameras).
        region_masks: ``(width, height) -> (R, H, W) bool`` for device-side region overlaps.
        metrics: a :class:`daemon.ops.metrics.Metrics` (re-anchors, resets, dropped tentative
            people, rejected new people).
        masks: put each person's full-frame mask in :class:`TrackedPerson` (region logic, events
            and snapshots use it today); False returns only boxes, footprints and overlaps, so
            masks are not copied from the device.
    """

    def __init__(
        self,
        model: Sam2Model,
        cfg: Sam2Config,
        *,
        lost_after_s: float = 2.0,
        camera: str = "",
        region_masks: RegionMasks | None = None,
        metrics=None,
        masks: bool = True,
    ):
        self.model = model
        self.cfg = cfg
        self.camera = camera
        self.lost_after_s = lost_after_s
        self.metrics = metrics
        self.masks = masks
        self.client = model.server.camera(camera, region_masks=region_masks, bgr=True)
        self._has_regions = region_masks is not None
        self._tracks: dict[int, _Track] = {}
        self._next_id = 1
        self._next_track_pts = float("-inf")
        self._last: tuple[int, float] | None = None  # (index, pts) of the last frame seen
        self._epoch = 0
        self._removals: list[int] = []
        self._reset_pending = False
        self.skipped_full = 0

    @property
    def active(self) -> int:
        """People reported (confirmed) and still tracked."""
        return sum(t.confirmed for t in self._tracks.values())

    @property
    def wants_detection(self) -> bool:
        """SAM2 follows by itself; the detector keeps its own cadence."""
        return False

    @property
    def tentative(self) -> tuple[int, ...]:
        return tuple(tid for tid, t in self._tracks.items() if not t.confirmed)

    # ----------------------------------------------------------------------------- update
    def update(self, frame: Frame, detections: Detections | None) -> TrackUpdate | None:
        ended = self._check_continuity(frame)
        due = frame.pts_s + 1e-6 >= self._next_track_pts
        if not due and detections is None:
            return TrackUpdate(frame, (), tuple(ended)) if ended else None
        self._next_track_pts = frame.pts_s + 1.0 / self.cfg.track_fps
        dets = detections if detections is not None and len(detections) else None
        with_frame = dets is not None and not self._tracks
        # Nobody tracked: every detection is new, so the prompts ride with the frame.
        first = self._new_people(frame, dets, range(len(dets))) if with_frame else []
        ended += self._take_result(self._request(frame.image, first), frame)
        if dets is not None and not with_frame:
            prompts = self._match(frame, dets)
            if prompts:
                ended += self._take_result(self._request(None, prompts), frame)
        ended += self._after_step(frame)
        return TrackUpdate(frame, self._reported(frame), tuple(sorted(ended)))

    def finish(self, frame: Frame | None) -> TrackUpdate | None:
        ended = self._drop_all()
        self._reset_pending = False
        self._removals.clear()
        try:
            self.client.submit(reset=True).result()
        except RuntimeError as e:  # the server is gone (shutdown) or failed: nothing left to free
            log.warning("camera %s: SAM2 reset at the end failed: %s", self.camera, e)
        if frame is None or not ended:
            return None
        return TrackUpdate(frame, (), tuple(ended))

    def close(self) -> None:
        """Unregister the camera from the server (its pipeline was stopped by a reload)."""
        try:
            self.client.close()
        except RuntimeError as e:  # the server is gone (shutdown) or failed: nothing left to free
            log.warning("camera %s: SAM2 close failed: %s", self.camera, e)

    # ----------------------------------------------------------------------------- steps
    def _check_continuity(self, frame: Frame) -> list[int]:
        """End everyone on a stream discontinuity (the server forgets them with the next request)."""
        last, self._last = self._last, (frame.index, frame.pts_s)
        if last is None:
            return []
        if frame.index <= last[0]:
            reason = "restart"
        elif frame.pts_s - last[1] > self.cfg.reset_gap_s or frame.pts_s < last[1]:
            reason = "gap"
        else:
            return []
        log.info(
            "camera %s: stream discontinuity (%s: frame %d at %.2f s after frame %d at %.2f s); SAM2 state reset",
            self.camera, reason, frame.index, frame.pts_s, last[0], last[1],
        )
        if self.metrics is not None:
            self.metrics.sam2_resets.labels(self.camera, reason).inc()
        self._reset_pending = True
        self._next_track_pts = float("-inf")
        return self._drop_all()

    def _drop_all(self) -> list[int]:
        ended = sorted(tid for tid, t in self._tracks.items() if t.confirmed)
        self._tracks.clear()
        return ended

    def _request(self, image: np.ndarray | None, prompts: list[Prompt]) -> CameraResult:
        removals, self._removals = self._removals, []
        reset, self._reset_pending = self._reset_pending, False
        return self.client.submit(image, prompts=prompts, remove=removals, reset=reset, masks=self.masks).result()

    def _take_result(self, result: CameraResult, frame: Frame) -> list[int]:
        """Record SAM2's outputs; returns ids ended because the server dropped the camera."""
        ended = []
        if result.epoch != self._epoch:
            # An earlier tick failed: the server dropped everyone it had, not those prompted now.
            self._epoch = result.epoch
            fresh = {tid for tid, out in result.people.items() if out.prompted}
            ended = sorted(tid for tid, t in self._tracks.items() if t.confirmed and tid not in fresh)
            self._tracks = {tid: t for tid, t in self._tracks.items() if tid in fresh}
            if self.metrics is not None:
                self.metrics.sam2_resets.labels(self.camera, "failure").inc()
        for tid in result.rejected:
            self._tracks.pop(tid, None)
            self._overload(f"the server's max_people_total={self.model.server.max_people}")
        for tid, out in result.people.items():
            track = self._tracks.get(tid)
            if track is None:
                continue
            track.result = out
            if out.present:
                track.last_present_pts = frame.pts_s
        return ended

    def _overload(self, why: str) -> None:
        """A new person is not tracked: a person budget is full (the server counts its own)."""
        self.skipped_full += 1
        log.warning("camera %s: %s reached, not tracking a new person", self.camera, why)

    def _new_people(self, frame: Frame, dets: Detections, rows) -> list[Prompt]:
        prompts = []
        for i in rows:
            if len(self._tracks) >= self.cfg.max_people:
                self._overload(f"max_people={self.cfg.max_people}")
                if self.metrics is not None:
                    self.metrics.sam2_people_rejected.labels(self.camera).inc()
                break
            tid, self._next_id = self._next_id, self._next_id + 1
            box = dets.xyxy[i].astype(np.float32)
            confirmed = self.cfg.confirm_steps == 0
            self._tracks[tid] = _Track(box, frame.pts_s, frame.pts_s, frame.pts_s, confirmed)
            prompts.append(self._prompt(tid, box))
        return prompts

    def _prompt(self, tid: int, box: np.ndarray) -> Prompt:
        if self.cfg.prompt == "points":
            from daemon.tracking.sam2_session import points_from_box

            points, labels = points_from_box(box)
            return Prompt(tid, points=points, labels=labels)
        return Prompt(tid, box=tuple(float(v) for v in box))

    def _match(self, frame: Frame, dets: Detections) -> list[Prompt]:
        """Match detections to people (IoU with mask box or last detector box); prompts for new
        people and for re-anchors."""
        ids = list(self._tracks)
        if not ids:  # everyone was just dropped (a failed tick): all detections are new
            return self._new_people(frame, dets, range(len(dets)))
        iou = box_iou(dets.xyxy, np.stack([self._tracks[t].det_box for t in ids]))
        mask_cols = [k for k, t in enumerate(ids) if self._present(t)]
        if mask_cols:
            mask_boxes = np.array([self._tracks[ids[k]].result.bbox for k in mask_cols], np.float32)
            mask_iou = box_iou(dets.xyxy, mask_boxes)
            iou[:, mask_cols] = np.maximum(iou[:, mask_cols], mask_iou)
        prompts, unmatched = [], []
        for i in np.argsort(-dets.confidence, kind="stable"):
            k = int(iou[i].argmax())
            if iou[i, k] < self.cfg.match_iou:
                unmatched.append(i)
                continue
            iou[:, k] = -1  # one detection per person
            tid, box = ids[k], dets.xyxy[i].astype(np.float32)
            track = self._tracks[tid]
            track.det_box, track.last_present_pts = box, frame.pts_s
            if not track.confirmed and frame.pts_s > track.born_pts:
                track.confirmed = True  # the detector found them again
            reason = self._reanchor_reason(tid, box, frame)
            if reason:
                track.cond_pts = frame.pts_s
                prompts.append(self._prompt(tid, box))
                if self.metrics is not None:
                    self.metrics.sam2_reanchors.labels(self.camera, reason).inc()
        return prompts + self._new_people(frame, dets, unmatched)

    def _present(self, tid: int) -> bool:
        result = self._tracks[tid].result
        return result is not None and result.present

    def _reanchor_reason(self, tid: int, det_box: np.ndarray, frame: Frame) -> str | None:
        track = self._tracks[tid]
        if not self._present(tid):
            return "lost"
        mask_box = np.asarray(track.result.bbox, np.float32)[None]
        if box_iou(det_box[None], mask_box)[0, 0] < self.cfg.reanchor_iou:
            return "disagree"
        if frame.pts_s - track.cond_pts > self.cfg.max_cond_age_s:
            return "age"
        return None

    def _after_step(self, frame: Frame) -> list[int]:
        """Confirm or drop tentative people, suppress duplicates, end the lost."""
        ended = []
        for tid, track in list(self._tracks.items()):
            if track.confirmed or track.result is None or track.result.prompted:
                continue
            if not track.result.present:
                self._drop(tid, "lost")
                continue
            track.seen_steps += 1
            track.confirmed = track.seen_steps >= self.cfg.confirm_steps
        ended += self._suppress_duplicates()
        for tid, track in list(self._tracks.items()):
            if frame.pts_s - track.last_present_pts > self.lost_after_s:
                ended += [tid] if track.confirmed else []
                self._drop(tid, "lost")
        return ended

    def _suppress_duplicates(self) -> list[int]:
        present = [tid for tid in self._tracks if self._present(tid)]
        if len(present) < 2:
            return []
        boxes = np.array([self._tracks[t].result.bbox for t in present], np.float32)
        iou = np.triu(box_iou(boxes, boxes), k=1)
        ended = []
        for a, b in zip(*np.nonzero(iou >= self.cfg.duplicate_iou)):
            older, younger = sorted((present[a], present[b]))
            # Keep a confirmed person over a tentative one, else the older one.
            if self._tracks.get(older) and self._tracks.get(younger):
                drop = older if self._tracks[younger].confirmed and not self._tracks[older].confirmed else younger
                ended += [drop] if self._tracks[drop].confirmed else []
                self._drop(drop, "duplicate")
        return ended

    def _drop(self, tid: int, reason: str) -> None:
        track = self._tracks.pop(tid)
        self._removals.append(tid)
        if not track.confirmed and self.metrics is not None:
            self.metrics.sam2_tentative_dropped.labels(self.camera, reason).inc()

    def _reported(self, frame: Frame) -> tuple[TrackedPerson, ...]:
        people = []
        width, height = frame.size
        for tid in sorted(self._tracks):
            track = self._tracks[tid]
            out = track.result
            if not track.confirmed or out is None or not out.present:
                continue
            mask = out.mask.full(width, height) if out.mask is not None else None
            people.append(
                TrackedPerson(
                    tid, np.asarray(out.bbox, np.float32), _sigmoid(out.score), mask, out.footprint,
                    out.overlaps if self._has_regions else None,
                )
            )
        for track in self._tracks.values():
            track.result = None
        return tuple(people)
