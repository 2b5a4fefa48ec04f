"""Streaming, memory-bounded, batched multi-person SAM2 tracking for one camera.

The official ``SAM2VideoPredictor`` wants a finite video loaded up front, keeps every frame's
outputs forever and steps each object separately. :class:`StreamingSam2Session` drives the same
``SAM2Base`` model modules on an endless stream instead:

* frames arrive one at a time; the image encoder runs at most once per frame (and not at all on
  frames where nobody is tracked or added);
* all people whose memory layouts match (same conditioning/recent memory slots and pointer
  count) are tracked in one batched forward of memory attention, SAM heads and memory encoder;
* per person it keeps only what SAM2 attends to: the conditioning (prompted) frames, capped;
  the mask memories of the last ``num_maskmem - 1`` frames; the object pointers of the last
  ``max_obj_ptrs_in_encoder - 1`` frames. Everything else is dropped every step.

Masks match the official predictor run per object (tests check mask IoU >= 0.99).

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
    ...     hydra_overrides_extra=["++model.image_size=256"], apply_postprocessing=False)
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils.misc import fill_holes_in_mask_scores

__all__ = ["PersonOutput", "SessionFullError", "StreamingSam2Session", "points_from_box"]

# sam2.utils.misc.load_video_frames normalisation (ImageNet mean/std).
_IMG_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32)[:, None, None]
_IMG_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32)[:, None, None]


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


def _preprocess(frame: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, S, S) float32, exactly as sam2's JPEG video loader does it."""
    resized = np.array(Image.fromarray(frame).resize((image_size, image_size))) / 255.0
    image = torch.from_numpy(resized).permute(2, 0, 1).float().to(device)
    return ((image - _IMG_MEAN.to(device)) / _IMG_STD.to(device)).unsqueeze(0)


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
    """One tracked person's retained memory. ``cond``: prompted frames (insertion order)."""

    cond: dict[int, _FrameMemory] = field(default_factory=dict)
    recent: dict[int, _FrameMemory] = field(default_factory=dict)
    score: float = float("nan")

    def tensors(self) -> Iterator[torch.Tensor]:
        for mem in (*self.cond.values(), *self.recent.values()):
            yield mem.obj_ptr
            if mem.maskmem is not None:
                yield mem.maskmem


@dataclass(frozen=True, slots=True)
class _MemoryPlan:
    """The memory one person attends to on one frame, in SAM2's token order.

    ``maskmems``: (t_pos, memory) slots, conditioning frames first (t_pos 0); ``pointers``:
    (temporal distance, pointer). People with equal :attr:`layout` can share one batch.
    """

    maskmems: tuple[tuple[int, torch.Tensor], ...]
    pointers: tuple[tuple[int, torch.Tensor], ...]

    @property
    def layout(self) -> tuple[tuple[int, ...], int]:
        return tuple(t_pos for t_pos, _ in self.maskmems), len(self.pointers)


class _CurrentFrame:
    """The current frame: its preprocessed image and, once needed, its image features."""

    def __init__(self, model: SAM2VideoPredictor, frame: np.ndarray) -> None:
        self.height, self.width = int(frame.shape[0]), int(frame.shape[1])
        self._model = model
        self._image = _preprocess(frame, model.image_size, model.device)
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
            id again (:meth:`add_person`) adds one; past the cap the oldest but the first is
            demoted to an ordinary memory (and soon forgotten).
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
            layout matches. Batching pays on a GPU; on a 2-core CPU (image_size 512) it does not
            (batches of 8 measured ~10% slower than of 1-2, with more transient memory).

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
    ) -> None:
        if max_cond_frames < 1 or num_frames < 2 or (max_batch is not None and max_batch < 1):
            raise ValueError("needs max_cond_frames >= 1, num_frames >= 2 and max_batch >= 1")
        if model.num_maskmem < 1 or model.non_overlap_masks_for_mem_enc:
            raise ValueError("needs a model with mask memory and per-object memory encoding")
        self.max_cond_frames = max_cond_frames
        self.num_frames = num_frames
        self.max_people = max_people
        self.max_batch = max_batch
        self._model = model
        self._autocast_dtype = autocast_dtype
        self._max_ptrs = min(num_frames, model.max_obj_ptrs_in_encoder) if model.use_obj_ptrs_in_encoder else 1
        self._people: dict[int, _Person] = {}
        self._frame: _CurrentFrame | None = None
        self._frame_index = -1
        self._maskmem_pos: torch.Tensor | None = None  # (hw, 1, mem_dim), same for all memories

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
        )

    # ----------------------------------------------------------------------------- commands
    def remove_person(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` and free its memory (KeyError when unknown)."""
        del self._people[obj_id]

    def step(self, frame: np.ndarray) -> dict[int, PersonOutput]:
        """Make ``frame`` (HxWx3 uint8 RGB) current and track every person on it."""
        self._frame = _CurrentFrame(self._model, frame)
        self._frame_index += 1
        if not self._people:
            return {}
        plans = {obj_id: self._plan(person) for obj_id, person in self._people.items()}
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
        prompt becomes one of its conditioning frames (its earlier memories are kept).
        """
        if self._frame is None:
            raise RuntimeError("add_person needs a current frame: call step(frame) first")
        if obj_id not in self._people and self.max_people is not None and len(self._people) >= self.max_people:
            raise SessionFullError(f"already tracking max_people={self.max_people}")
        point_inputs = self._point_inputs(box, points, labels)
        model = self._model
        with self._inference():
            feats, pos, sizes = self._frame.features(1)
            out = model.track_step(
                frame_idx=self._frame_index,
                is_init_cond_frame=True,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=point_inputs,
                mask_inputs=None,
                output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=self.num_frames,
                run_mem_encoder=False,
            )
            masks = self._fill_holes(out["pred_masks"])
            # As propagate_in_video_preflight: memory from the (hole-filled) low-res mask.
            high_res = F.interpolate(masks, size=(model.image_size,) * 2, mode="bilinear", align_corners=False)
            maskmem, maskmem_pos = model._encode_new_memory(
                feats, sizes, high_res, out["object_score_logits"], is_mask_from_pts=True
            )
            self._keep_maskmem_pos(maskmem_pos)
            person = self._people.setdefault(obj_id, _Person())
            person.recent.pop(self._frame_index, None)
            person.cond[self._frame_index] = _FrameMemory(maskmem.to(torch.bfloat16), out["obj_ptr"])
            self._cap_cond(person)
            self._forget(person)
            person.score = float(out["object_score_logits"])
            return self._outputs({obj_id: masks})[obj_id]

    # ----------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        dtype = self._autocast_dtype
        with torch.inference_mode(), torch.autocast(self._model.device.type, dtype=dtype, enabled=dtype is not None):
            yield

    def _point_inputs(self, box, points, labels) -> dict[str, torch.Tensor]:
        """Prompt points scaled to the model's input, as ``add_new_points_or_box`` builds them."""
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
        coords = coords[None] / torch.tensor([self._frame.width, self._frame.height]) * self._model.image_size
        device = self._model.device
        return {"point_coords": coords.to(device), "point_labels": kinds[None].to(device)}

    def _maskmem_frame(self, frame_idx: int, t_rel: int) -> int:
        """The frame whose mask memory sits ``t_rel`` slots back (``_prepare_memory_conditioned_features``)."""
        if t_rel == 1:
            return frame_idx - 1
        stride = self._model.memory_temporal_stride_for_eval
        return ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride

    def _plan(self, person: _Person) -> _MemoryPlan:
        """Select what ``person`` attends to on the current frame, as SAM2 selects it.

        Every stored frame is in the past, so SAM2's "past pointers only" filter and signed vs
        unsigned pointer distances make no difference here.
        """
        model, now = self._model, self._frame_index
        selected, unselected = select_closest_cond_frames(now, person.cond, model.max_cond_frames_in_attn)
        maskmems = [(0, mem.maskmem) for mem in selected.values()]
        for t_pos in range(1, model.num_maskmem):
            frame_idx = self._maskmem_frame(now, model.num_maskmem - t_pos)
            mem = person.recent.get(frame_idx, unselected.get(frame_idx))
            if mem is not None:
                maskmems.append((t_pos, mem.maskmem))
        pointers = []
        if model.use_obj_ptrs_in_encoder:
            pointers = [(now - t, mem.obj_ptr) for t, mem in selected.items()]
            for t_diff in range(1, self._max_ptrs):
                mem = person.recent.get(now - t_diff, unselected.get(now - t_diff))
                if mem is not None:
                    pointers.append((t_diff, mem.obj_ptr))
        return _MemoryPlan(tuple(maskmems), tuple(pointers))

    def _memory(self, plans: list[_MemoryPlan]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batched (memory, memory pos, pointer token count) for people with one layout."""
        model, batch = self._model, len(plans)
        t_pos = [t for t, _ in plans[0].maskmems]
        maskmem = torch.stack([torch.cat([m for _, m in plan.maskmems]) for plan in plans], dim=1)
        memory = [maskmem.flatten(3).permute(0, 3, 1, 2).flatten(0, 1)]  # (slots*hw, B, mem_dim)
        tpos_enc = model.maskmem_tpos_enc[[model.num_maskmem - t - 1 for t in t_pos]]
        memory_pos = [(self._maskmem_pos[None] + tpos_enc).flatten(0, 1).expand(-1, batch, -1)]
        num_ptr_tokens = 0
        if plans[0].pointers:
            ptrs = torch.stack([torch.cat([p for _, p in plan.pointers]) for plan in plans], dim=1)
            if model.add_tpos_enc_to_obj_ptrs:
                dist = torch.tensor([[d for d, _ in plan.pointers] for plan in plans], device=ptrs.device)
                tpos_dim = model.hidden_dim if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
                ptr_pos = get_1d_sine_pe(dist / (self._max_ptrs - 1), dim=tpos_dim)
                ptr_pos = model.obj_ptr_tpos_proj(ptr_pos).transpose(0, 1)  # (P, B, mem_dim)
            else:
                ptr_pos = ptrs.new_zeros(ptrs.shape[0], batch, model.mem_dim)
            split = model.hidden_dim // model.mem_dim  # a pointer becomes `split` memory tokens
            ptrs = ptrs.reshape(-1, batch, split, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            memory.append(ptrs)
            memory_pos.append(ptr_pos.repeat_interleave(split, dim=0))
            num_ptr_tokens = ptrs.shape[0]
        return torch.cat(memory), torch.cat(memory_pos), num_ptr_tokens

    def _track_batch(self, ids: list[int], plans: list[_MemoryPlan]) -> dict[int, torch.Tensor]:
        """One batched SAM2 tracking step (``_track_step`` + memory encoder), one memory layout.

        Stores each person's new memory and returns their low-res mask logits (1, 1, h, w).
        """
        model, batch = self._model, len(ids)
        feats, pos, sizes = self._frame.features(batch)
        memory, memory_pos, num_ptr_tokens = self._memory(plans)
        height, width = sizes[-1]
        pix_feat = model.memory_attention(
            curr=feats[-1:],
            curr_pos=pos[-1:],
            memory=memory,
            memory_pos=memory_pos,
            num_obj_ptr_tokens=num_ptr_tokens,
        )
        pix_feat = pix_feat.permute(1, 2, 0).view(batch, model.hidden_dim, height, width)
        high_res_features = [
            x.permute(1, 2, 0).view(batch, x.size(2), *size) for x, size in zip(feats[:-1], sizes[:-1])
        ]
        _, _, _, low_res, high_res, obj_ptr, scores = model._forward_sam_heads(
            backbone_features=pix_feat,
            high_res_features=high_res_features or None,
            multimask_output=model._use_multimask(False, None),
        )
        maskmem, maskmem_pos = model._encode_new_memory(feats, sizes, high_res, scores, is_mask_from_pts=False)
        self._keep_maskmem_pos(maskmem_pos)
        low_res = self._fill_holes(low_res)
        # Copies, so that a person's memory does not pin the whole batch's tensors.
        rows = zip(ids, maskmem.split(1), obj_ptr.split(1), scores.flatten().tolist())
        for obj_id, mem, ptr, score in rows:
            person = self._people[obj_id]
            person.recent[self._frame_index] = _FrameMemory(mem.to(torch.bfloat16, copy=True), ptr.clone())
            person.score = score
            self._forget(person)
        return dict(zip(ids, low_res.split(1)))

    def _keep_maskmem_pos(self, maskmem_pos: list[torch.Tensor]) -> None:
        if self._maskmem_pos is None:
            self._maskmem_pos = maskmem_pos[-1][:1].flatten(2).permute(2, 0, 1).clone()

    def _cap_cond(self, person: _Person) -> None:
        """Keep the first and the latest conditioning frames; demote the rest to recent memory."""
        while len(person.cond) > self.max_cond_frames:
            second = list(person.cond)[1]
            person.recent[second] = person.cond.pop(second)

    def _forget(self, person: _Person) -> None:
        """Drop what the next step cannot attend to: old mask memories, then old pointers."""
        model, upcoming = self._model, self._frame_index + 1
        maskmem_frames = {self._maskmem_frame(upcoming, t_rel) for t_rel in range(1, model.num_maskmem)}
        oldest_ptr = upcoming - (self._max_ptrs - 1)
        person.recent = {
            t: mem if t in maskmem_frames else replace(mem, maskmem=None)
            for t, mem in person.recent.items()
            if t in maskmem_frames or t >= oldest_ptr
        }

    def _fill_holes(self, low_res: torch.Tensor) -> torch.Tensor:
        """The official predictor's optional hole filling of output masks (needs sam2's CUDA op)."""
        if self._model.fill_hole_area > 0:
            return fill_holes_in_mask_scores(low_res, self._model.fill_hole_area)
        return low_res

    def _outputs(self, low_res: dict[int, torch.Tensor]) -> dict[int, PersonOutput]:
        """Low-res mask logits -> masks at the frame's resolution, bboxes and scores."""
        ids = list(low_res)
        size = (self._frame.height, self._frame.width)
        logits = F.interpolate(torch.cat([low_res[i] for i in ids]), size=size, mode="bilinear", align_corners=False)
        if self._model.non_overlap_masks:
            logits = self._model._apply_non_overlapping_constraints(logits)
        masks = logits[:, 0] > 0
        rows, cols = masks.any(dim=2).to(torch.uint8), masks.any(dim=1).to(torch.uint8)
        boxes = torch.stack(
            [
                cols.argmax(1),
                rows.argmax(1),
                cols.shape[1] - cols.flip(1).argmax(1),
                rows.shape[1] - rows.flip(1).argmax(1),
                rows.amax(1),
            ],
            dim=1,
        ).tolist()
        masks_np = masks.cpu().numpy()
        return {
            obj_id: PersonOutput(
                mask=mask,
                score=self._people[obj_id].score,
                bbox=tuple(box[:4]) if box[4] else None,
            )
            for obj_id, mask, box in zip(ids, masks_np, boxes)
        }
