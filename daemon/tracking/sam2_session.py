"""Streaming, memory-bounded, batched multi-person SAM2 tracking for one camera (the reference).

The official ``SAM2VideoPredictor`` wants a finite video loaded up front, keeps every frame's
outputs forever and steps each object separately. :class:`StreamingSam2Session` drives the same
``SAM2Base`` model modules on an endless stream instead:

* frames arrive one at a time; the image encoder runs at most once per frame (and not at all on
  frames where nobody is tracked or added);
* all people whose memory layouts match (same number of mask-memory slots and pointers) are
  tracked in one batched forward of memory attention, SAM heads and memory encoder;
* per person it keeps only what SAM2 attends to (:class:`~daemon.tracking.sam2_memory.MemoryPlanner`):
  the most recent conditioning (prompted) frames, capped; the mask memories of the last
  ``num_maskmem - 1`` frames; the object pointers of the last ``max_ptrs - 1`` frames.

It is the per-camera reference for :class:`~daemon.tracking.sam2_server.Sam2Server` (which serves
every camera from one worker with preallocated memory banks): tests check, at the inputs and
outputs of ``memory_attention``, that this session matches the official predictor run per object
and that the server matches this session.

Reverse propagation: SAM2's memory only uses *distances between steps*, and the session only
sees an increasing step counter. A fresh session fed buffered frames newest-first therefore
tracks backwards exactly like the official predictor's ``propagate_in_video(reverse=True)``
(with ``memory_temporal_stride_for_eval == 1``, as in every SAM2.1 config); see
:meth:`StreamingSam2Session.sibling`.

Example (random weights, so the masks mean nothing; the mechanics are real):

    >>> import numpy as np, torch
    >>> from sam2.build_sam import build_sam2_video_predictor
    >>> _ = torch.manual_seed(0)
    >>> model = build_sam2_video_predictor(
    ...     "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
    ...     hydra_overrides_extra=["++model.image_size=128"], apply_postprocessing=False)
    >>> session = StreamingSam2Session(model)
    >>> frame = np.zeros((120, 160, 3), np.uint8)
    >>> session.step(frame)
    {}
    >>> out = session.add_person(7, box=[40, 20, 100, 110])
    >>> out.mask.shape, out.mask.dtype
    ((120, 160), dtype('bool'))
    >>> sorted(session.step(frame)), session.people, session.frame_index
    ([7], (7,), 1)
    >>> session.remove_person(7)
    >>> session.people
    ()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils.misc import fill_holes_in_mask_scores

from daemon.tracking import sam2_device as dev
from daemon.tracking.sam2_memory import MemoryPlan, MemoryPlanner, PersonFrames

__all__ = ["PersonOutput", "SessionFullError", "StreamingSam2Session", "point_inputs", "points_from_box"]


class SessionFullError(RuntimeError):
    """Raised by :meth:`StreamingSam2Session.add_person` when ``max_people`` are tracked."""


@dataclass(frozen=True, slots=True)
class PersonOutput:
    """One person on one frame.

    ``mask`` is bool HxW at the frame's original resolution; ``score`` is SAM2's object score
    logit (> 0: SAM2 thinks the person is visible); ``bbox`` is the mask's box as pixel-edge
    ``(x1, y1, x2, y2)`` (x2/y2 exclusive, comparable with detector xyxy boxes), None when the
    mask is empty.
    """

    mask: np.ndarray
    score: float
    bbox: tuple[int, int, int, int] | None

    @property
    def present(self) -> bool:
        return self.score > 0


def points_from_box(box: Sequence[float], distance_frac: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Positive click prompts from a person box: the notebook's ``add_points_around_bbox``.

    The box centre, a point ``d`` below it and one ``3 d`` above it (image y grows downwards),
    with ``d = distance_frac * box height``. Returns ``(points (3, 2) float32, labels (3,) int32)``.

    >>> points, labels = points_from_box([10, 0, 30, 100])
    >>> points.tolist(), labels.tolist()
    ([[20.0, 50.0], [20.0, 55.0], [20.0, 35.0]], [1, 1, 1])
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, d = (x1 + x2) / 2, (y1 + y2) / 2, distance_frac * (y2 - y1)
    points = np.array([[cx, cy], [cx, cy + d], [cx, cy - 3 * d]], dtype=np.float32)
    return points, np.ones(len(points), dtype=np.int32)


def point_inputs(box, points, labels, width: int, height: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A prompt as SAM2's ``add_new_points_or_box`` encodes it: ((P, 2) float32 coords scaled to
    the model input, (P,) int32 labels); a box comes first as two points labelled 2 and 3.

    >>> coords, kinds = point_inputs([0, 0, 50, 100], None, None, 100, 200, 64)
    >>> coords.tolist(), kinds.tolist()
    ([[0.0, 0.0], [32.0, 32.0]], [2, 3])
    """
    if box is None and points is None:
        raise ValueError("give a box or points")
    if (points is None) != (labels is None):
        raise ValueError("points and labels go together")
    coords = torch.zeros(0, 2, dtype=torch.float32)
    kinds = torch.zeros(0, dtype=torch.int32)
    if box is not None:
        coords = torch.as_tensor(np.asarray(box, np.float32).reshape(2, 2))
        kinds = torch.tensor([2, 3], dtype=torch.int32)
    if points is not None:
        coords = torch.cat([coords, torch.as_tensor(np.asarray(points, np.float32).reshape(-1, 2))])
        kinds = torch.cat([kinds, torch.as_tensor(np.asarray(labels, np.int32).reshape(-1))])
    # The same float32 operations as add_new_points_or_box, so the scaled points are identical.
    coords = coords / torch.tensor([width, height]) * image_size
    return coords.numpy(), kinds.numpy()


def pil_preprocess(frame: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, S, S) float32, exactly as sam2's JPEG video loader does it."""
    resized = np.array(Image.fromarray(frame).resize((image_size, image_size))) / 255.0
    image = torch.from_numpy(resized).permute(2, 0, 1).float().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]
    return ((image - mean) / std).unsqueeze(0)


@dataclass(frozen=True, slots=True)
class _FrameMemory:
    """What later frames read from one person's output on one frame.

    ``maskmem``: spatial mask memory (1, mem_dim, h, w) in bfloat16 like the official predictor
    stores it; None once the frame is too old for mask memory but still inside the pointer
    window. ``obj_ptr``: object pointer (1, hidden_dim).
    """

    maskmem: torch.Tensor | None
    obj_ptr: torch.Tensor


@dataclass(slots=True)
class _Person:
    """One tracked person: which frames they remember (``frames``) and those memories."""

    frames: PersonFrames = field(default_factory=PersonFrames)
    memory: dict[int, _FrameMemory] = field(default_factory=dict)
    score: float = float("nan")

    def tensors(self) -> Iterator[torch.Tensor]:
        for mem in self.memory.values():
            yield mem.obj_ptr
            if mem.maskmem is not None:
                yield mem.maskmem

    def prune(self) -> None:
        """Drop the memories the planner forgot (after :class:`MemoryPlanner` updated ``frames``)."""
        alive, with_mask = self.frames.alive(), self.frames.with_mask()
        self.memory = {
            t: mem if t in with_mask else _FrameMemory(None, mem.obj_ptr) for t, mem in self.memory.items() if t in alive
        }


class _CurrentFrame:
    """The current frame: its preprocessed image and, once needed, its image features."""

    def __init__(self, model: SAM2VideoPredictor, frame: np.ndarray, image: torch.Tensor) -> None:
        self.height, self.width = int(frame.shape[0]), int(frame.shape[1])
        self._model = model
        self._image = image
        self._backbone_out: dict | None = None

    def features(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """(vision feats, vision pos embeds, feat sizes) expanded to ``batch_size``, encoding once.

        Mirrors ``SAM2VideoPredictor._get_image_feature``.
        """
        if self._backbone_out is None:
            self._backbone_out = self._model.forward_image(self._image)
        expanded = {
            key: [x.expand(batch_size, -1, -1, -1) for x in self._backbone_out[key]]
            for key in ("backbone_fpn", "vision_pos_enc")
        }
        _, feats, pos, sizes = self._model._prepare_backbone_features(expanded)
        return feats, pos, sizes

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self._image
        if self._backbone_out is not None:
            yield from self._backbone_out["backbone_fpn"]
            yield from self._backbone_out["vision_pos_enc"]


class StreamingSam2Session:
    """Tracks people on one camera's frames with SAM2, batched and with bounded memory.

    Args:
        model: what ``sam2.build_sam.build_sam2_video_predictor`` returns; used only as the
            model (its ``init_state``/``propagate_in_video`` are never called). Not modified.
        max_cond_frames: cap on conditioning (prompted) frames per person. Prompting a tracked
            id again (:meth:`add_person`) adds one; past the cap the oldest is demoted to an
            ordinary memory (and soon forgotten), so the most recent prompts are kept.
        num_frames: the clip length the session imitates. SAM2 attends to the object pointers
            of ``min(num_frames, model.max_obj_ptrs_in_encoder) - 1`` previous frames and
            normalises their temporal encoding by that count, so the session behaves like the
            official predictor on a clip of ``num_frames`` frames. Any value >= 16 (the
            ``max_obj_ptrs_in_encoder`` of every SAM2.1 config) gives identical results; the
            official predictor's end-of-clip cut-off does not apply to a stream.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under ``torch.autocast`` (CUDA); None
            runs in the model's dtype.
        max_people: cap on simultaneously tracked people (:class:`SessionFullError` past it).
        max_batch: cap on people per batched forward; None batches every person whose memory
            layout matches.
        preprocess: ``"pil"`` resizes on the host with PIL like sam2's JPEG loader (bit-exact
            with the official predictor); ``"device"`` uploads the uint8 frame and resizes on the
            device (:func:`daemon.tracking.sam2_device.preprocess`, what the server does).

    Call :meth:`step` once per frame, then :meth:`add_person` for new people on that frame.
    Not thread-safe: drive one session from one thread.
    """

    def __init__(
        self,
        model: SAM2VideoPredictor,
        *,
        max_cond_frames: int = 2,
        num_frames: int = 16,
        autocast_dtype: torch.dtype | None = None,
        max_people: int | None = None,
        max_batch: int | None = None,
        preprocess: Literal["pil", "device"] = "pil",
    ) -> None:
        if max_cond_frames < 1 or num_frames < 2 or (max_batch is not None and max_batch < 1):
            raise ValueError("needs max_cond_frames >= 1, num_frames >= 2 and max_batch >= 1")
        if model.num_maskmem < 1 or model.non_overlap_masks_for_mem_enc:
            raise ValueError("needs a model with mask memory and per-object memory encoding")
        if preprocess not in ("pil", "device"):
            raise ValueError(f"preprocess must be 'pil' or 'device', not {preprocess!r}")
        self.max_cond_frames = max_cond_frames
        self.num_frames = num_frames
        self.max_people = max_people
        self.max_batch = max_batch
        self.preprocess = preprocess
        self._model = model
        self._autocast_dtype = autocast_dtype
        self.planner = MemoryPlanner.for_model(model, num_frames=num_frames, max_cond_frames=max_cond_frames)
        self._people: dict[int, _Person] = {}
        self._frame: _CurrentFrame | None = None
        self._frame_index = -1
        self._maskmem_pos: torch.Tensor | None = None  # (hw, mem_dim), same for all memories
        # Tests: called with the (frame index, person id) of each batch row before memory attention.
        self.on_attention: Callable[[list[tuple[int, int]]], None] | None = None

    # ----------------------------------------------------------------------------- queries
    @property
    def people(self) -> tuple[int, ...]:
        """Ids of the tracked people, in the order they were added."""
        return tuple(self._people)

    @property
    def frame_index(self) -> int:
        """Steps taken so far minus one: the current frame's index (-1 before the first step)."""
        return self._frame_index

    def presence(self, obj_id: int) -> float:
        """The person's last SAM2 object score logit (> 0: visible)."""
        return self._people[obj_id].score

    def memory_bytes(self) -> int:
        """Bytes of the tensors the session retains (memories, current frame, constants)."""
        tensors = [t for person in self._people.values() for t in person.tensors()]
        if self._frame is not None:
            tensors.extend(self._frame.tensors())
        if self._maskmem_pos is not None:
            tensors.append(self._maskmem_pos)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def sibling(self) -> StreamingSam2Session:
        """A new, empty session with this one's model and settings.

        E.g. to track a person backwards: feed it buffered frames newest-first and prompt the
        person on the first frame fed (see the module docstring).
        """
        return StreamingSam2Session(
            self._model,
            max_cond_frames=self.max_cond_frames,
            num_frames=self.num_frames,
            autocast_dtype=self._autocast_dtype,
            max_people=self.max_people,
            max_batch=self.max_batch,
            preprocess=self.preprocess,
        )

    # ----------------------------------------------------------------------------- commands
    def remove_person(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` and free its memory (KeyError when unknown)."""
        del self._people[obj_id]

    def reset(self) -> None:
        """Forget everyone (e.g. after a stream discontinuity); the step counter goes on."""
        self._people.clear()

    def step(self, frame: np.ndarray) -> dict[int, PersonOutput]:
        """Make ``frame`` (HxWx3 uint8 RGB) current and track every person on it."""
        model = self._model
        if self.preprocess == "pil":
            image = pil_preprocess(frame, model.image_size, model.device)
        else:
            image = dev.preprocess([torch.from_numpy(np.ascontiguousarray(frame)).to(model.device)], model.image_size)
        self._frame = _CurrentFrame(model, frame, image)
        self._frame_index += 1
        if not self._people:
            return {}
        plans = {obj_id: self.planner.plan(person.frames, self._frame_index) for obj_id, person in self._people.items()}
        groups: dict[tuple, list[int]] = {}
        for obj_id, plan in plans.items():
            groups.setdefault(plan.layout, []).append(obj_id)
        size = self.max_batch or len(plans)
        batches = [ids[start : start + size] for ids in groups.values() for start in range(0, len(ids), size)]
        low_res: dict[int, torch.Tensor] = {}
        with self._inference():
            for ids in batches:
                low_res.update(self._track_batch(ids, [plans[i] for i in ids]))
            return self._outputs(low_res)

    def add_person(
        self,
        obj_id: int,
        *,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> PersonOutput:
        """Prompt ``obj_id`` on the current frame (the last one given to :meth:`step`).

        ``box`` is ``[x1, y1, x2, y2]`` and ``points`` (N, 2) ``x, y`` in the frame's pixels,
        ``labels`` (N,) 1 = positive, 0 = negative click (see :func:`points_from_box`). A new id
        starts being tracked from the next step. An id already tracked is re-anchored: this
        prompt becomes its newest conditioning frame (its earlier memories are kept).
        """
        if self._frame is None:
            raise RuntimeError("add_person needs a current frame: call step(frame) first")
        if obj_id not in self._people and self.max_people is not None and len(self._people) >= self.max_people:
            raise SessionFullError(f"already tracking max_people={self.max_people}")
        model = self._model
        coords, kinds = point_inputs(box, points, labels, self._frame.width, self._frame.height, model.image_size)
        prompt = {
            "point_coords": torch.from_numpy(coords)[None].to(model.device),
            "point_labels": torch.from_numpy(kinds)[None].to(model.device),
        }
        with self._inference():
            feats, pos, sizes = self._frame.features(1)
            masks, maskmem, maskmem_pos, obj_ptr, scores = prompt_step(model, feats, pos, sizes, prompt)
            self._keep_maskmem_pos(maskmem_pos)
            person = self._people.setdefault(obj_id, _Person())
            self.planner.prompted(person.frames, self._frame_index)
            person.memory[self._frame_index] = _FrameMemory(maskmem.to(torch.bfloat16), obj_ptr)
            person.prune()
            person.score = float(scores)
            return self._outputs({obj_id: masks})[obj_id]

    # ----------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        dtype = self._autocast_dtype
        with torch.inference_mode(), torch.autocast(self._model.device.type, dtype=dtype, enabled=dtype is not None):
            yield

    def _track_batch(self, ids: list[int], plans: list[MemoryPlan]) -> dict[int, torch.Tensor]:
        """One batched SAM2 tracking step (``_track_step`` + memory encoder), one memory layout.

        Stores each person's new memory and returns their low-res mask logits (1, 1, h, w).
        """
        model, batch, now = self._model, len(ids), self._frame_index
        feats, pos, sizes = self._frame.features(batch)
        people = [self._people[i] for i in ids]
        maskmem = torch.stack(
            [torch.cat([person.memory[t].maskmem for _, t in plan.maskmems]) for person, plan in zip(people, plans)]
        )
        t_pos = torch.tensor([[p for p, _ in plan.maskmems] for plan in plans], device=model.device)
        pointers = distances = None
        if plans[0].pointers:
            pointers = torch.stack(
                [torch.cat([person.memory[t].obj_ptr for _, t in plan.pointers]) for person, plan in zip(people, plans)]
            )
            distances = torch.tensor([[d for d, _ in plan.pointers] for plan in plans], device=model.device)
        memory, memory_pos, num_ptr_tokens = dev.memory_inputs(
            model, maskmem, self._maskmem_pos, t_pos, pointers, distances, self.planner.max_ptrs
        )
        if self.on_attention is not None:
            self.on_attention([(now, obj_id) for obj_id in ids])
        pix_feat = dev.attend(model, feats[-1], pos[-1], memory, memory_pos, num_ptr_tokens, sizes[-1])
        high_res = [x.permute(1, 2, 0).view(batch, x.size(2), *size) for x, size in zip(feats[:-1], sizes[:-1])]
        low_res, high_res_masks, obj_ptr, scores = dev.decode(model, pix_feat, high_res or None)
        maskmem, maskmem_pos = dev.encode_memory(model, feats[-1], sizes[-1], high_res_masks, scores, from_points=False)
        self._keep_maskmem_pos(maskmem_pos)
        low_res = fill_holes(model, low_res)
        # Copies, so that a person's memory does not pin the whole batch's tensors.
        rows = zip(people, maskmem.split(1), obj_ptr.split(1), scores.flatten().tolist())
        for person, mem, ptr, score in rows:
            self.planner.tracked(person.frames, now)
            person.memory[now] = _FrameMemory(mem.to(torch.bfloat16, copy=True), ptr.clone())
            person.prune()
            person.score = score
        return dict(zip(ids, low_res.split(1)))

    def _keep_maskmem_pos(self, maskmem_pos: list[torch.Tensor]) -> None:
        if self._maskmem_pos is None:
            self._maskmem_pos = maskmem_position(maskmem_pos)

    def _outputs(self, low_res: dict[int, torch.Tensor]) -> dict[int, PersonOutput]:
        """Low-res mask logits -> masks at the frame's resolution, bboxes and scores."""
        ids = list(low_res)
        size = (self._frame.height, self._frame.width)
        logits = F.interpolate(torch.cat([low_res[i] for i in ids]), size=size, mode="bilinear", align_corners=False)
        if self._model.non_overlap_masks:
            logits = self._model._apply_non_overlapping_constraints(logits)
        masks = logits[:, 0] > 0
        stats = dev.mask_stats(masks, None).tolist()
        masks_np = masks.cpu().numpy()
        return {
            obj_id: PersonOutput(
                mask=mask,
                score=self._people[obj_id].score,
                bbox=tuple(int(v) for v in row[:4]) if row[4] else None,
            )
            for obj_id, mask, row in zip(ids, masks_np, stats)
        }


def fill_holes(model, low_res: torch.Tensor) -> torch.Tensor:
    """The official predictor's optional hole filling of output masks (needs sam2's CUDA op)."""
    if model.fill_hole_area > 0:
        return fill_holes_in_mask_scores(low_res, model.fill_hole_area)
    return low_res


def maskmem_position(maskmem_pos: list[torch.Tensor]) -> torch.Tensor:
    """(h*w, mem_dim) from the memory encoder's spatial encodings: equal for every memory.

    Kept in the encoder's output dtype (bf16 under autocast), as the official predictor keeps it.
    """
    return maskmem_pos[-1][0].flatten(1).permute(1, 0).clone()


def prompt_step(model, feats, pos, sizes, prompt: dict):
    """A prompt on B people of one frame, as ``add_new_points_or_box`` + propagation preflight.

    Returns (hole-filled low-res mask logits, mask memory, its spatial encodings, object
    pointers, scores).
    """
    out = model.track_step(
        frame_idx=0,
        is_init_cond_frame=True,
        current_vision_feats=feats,
        current_vision_pos_embeds=pos,
        feat_sizes=sizes,
        point_inputs=prompt,
        mask_inputs=None,
        output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
        num_frames=None,  # an initial conditioning frame reads no memory
        run_mem_encoder=False,
    )
    masks = fill_holes(model, out["pred_masks"])
    # As propagate_in_video_preflight: memory from the (hole-filled) low-res mask.
    high_res = F.interpolate(masks, size=(model.image_size,) * 2, mode="bilinear", align_corners=False)
    scores = out["object_score_logits"]
    maskmem, maskmem_pos = dev.encode_memory(model, feats[-1], sizes[-1], high_res, scores, from_points=True)
    return masks, maskmem, maskmem_pos, out["obj_ptr"], scores
