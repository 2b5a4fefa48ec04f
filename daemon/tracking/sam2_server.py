"""One SAM2 worker per device that owns the model and every camera's streaming state.

Camera pipelines submit frames (with prompts, removals, resets) through a :class:`Sam2Camera`
and get a :class:`CameraResult` back; nothing is locked around the model. The worker serves
whatever is pending in *ticks*:

1. removals and resets; a camera's new frame becomes its current frame;
2. the frames of cameras that track someone (or get a prompt) are uploaded as uint8 (pinned),
   resized and normalised on the device and encoded together, padded to a fixed batch bucket
   (``encoder_batches``, so a compiled encoder sees few shapes); a camera with nobody tracked
   costs nothing;
3. every tracked person of every camera is stepped: memory attention batched over all people
   with the same memory layout (token counts; exact, since positions are per person), then SAM
   heads and memory encoder over everyone; memories live in preallocated device banks
   (``max_people`` rows, a fixed number of mask-memory and pointer slots each);
4. prompts (new people, re-anchors) run batched by prompt length;
5. post-processing on the device: mask box, footprint, area and overlap with each region of the
   camera; masks are bit-packed only for cameras that asked for them; everything comes back in
   one device-to-host copy per tick.

The memory selection is :class:`~daemon.tracking.sam2_memory.MemoryPlanner`'s, the same as the
per-camera :class:`~daemon.tracking.sam2_session.StreamingSam2Session`, which the tests use as
the reference at the inputs of ``memory_attention``.

Example (random weights; without a worker thread, waiting for a result runs the tick):

    >>> import numpy as np, torch
    >>> from sam2.build_sam import build_sam2_video_predictor
    >>> _ = torch.manual_seed(0)
    >>> model = build_sam2_video_predictor(
    ...     "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
    ...     hydra_overrides_extra=["++model.image_size=128"], apply_postprocessing=False)
    >>> server = Sam2Server(model, max_people=4, thread=False)
    >>> hall, yard = server.camera("hall"), server.camera("yard")
    >>> frame = np.zeros((120, 160, 3), np.uint8)
    >>> hall.step(frame).people                     # nobody tracked: nothing computed
    {}
    >>> out = hall.prompt([Prompt(1, box=(40, 20, 100, 110))], masks=True)
    >>> out.people[1].mask.full(160, 120).shape
    (120, 160)
    >>> a, b = hall.submit(frame), yard.submit(frame)    # one tick serves both cameras
    >>> sorted(a.result().people), b.result().people, server.people
    ([1], {}, 1)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from daemon.tracking import sam2_device as dev
from daemon.tracking.sam2_memory import MemoryPlanner, PersonFrames
from daemon.tracking.sam2_session import fill_holes, maskmem_position, point_inputs, prompt_step

__all__ = ["CameraResult", "MaskCrop", "PersonResult", "Prompt", "Sam2Camera", "Sam2Future", "Sam2Server", "ServerStats"]

log = logging.getLogger(__name__)

RegionMasks = Callable[[int, int], np.ndarray]
"""(width, height) -> (R, H, W) bool region masks of a camera at that frame size."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """Prompt ``obj_id`` on the camera's current frame: a box ``(x1, y1, x2, y2)`` and/or points
    ((N, 2) ``x, y`` with (N,) labels, 1 positive / 0 negative), in the frame's pixels."""

    obj_id: int
    box: tuple[float, float, float, float] | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class MaskCrop:
    """A mask inside its box: ``mask`` (h, w) bool whose top-left pixel is (``x``, ``y``)."""

    x: int
    y: int
    mask: np.ndarray

    def full(self, width: int, height: int) -> np.ndarray:
        """The mask at frame size (HxW bool)."""
        out = np.zeros((height, width), bool)
        h, w = self.mask.shape
        out[self.y : self.y + h, self.x : self.x + w] = self.mask
        return out


@dataclass(frozen=True, slots=True)
class PersonResult:
    """One person on one frame, post-processed on the device.

    ``score``: SAM2's object score logit (> 0: visible); ``bbox``: the mask's pixel-edge box
    (x2/y2 exclusive), None when empty; ``footprint``: centre of the mask's lowest row;
    ``area``: mask pixels; ``overlaps``: fraction of the mask inside each of the camera's
    regions; ``mask``: only when the request asked for masks; ``prompted``: this frame was a
    prompt for them (a new person or a re-anchor).
    """

    obj_id: int
    score: float
    bbox: tuple[int, int, int, int] | None
    footprint: tuple[float, float] | None
    area: int
    overlaps: tuple[float, ...] = ()
    mask: MaskCrop | None = None
    prompted: bool = False

    @property
    def present(self) -> bool:
        return self.score > 0 and self.bbox is not None


@dataclass(frozen=True, slots=True)
class CameraResult:
    """What one request returned: the camera's step index, its people, refused prompts.

    ``rejected``: ids of new people not tracked because the server's person budget is full;
    ``encoded``: the image encoder ran on this camera's frame in this request; ``epoch`` grows
    when the server dropped the camera's people after a failed tick.
    """

    frame_index: int
    people: dict[int, PersonResult]
    rejected: tuple[int, ...] = ()
    encoded: bool = False
    epoch: int = 0


@dataclass(slots=True)
class ServerStats:
    """Running totals, for benches and tests."""

    ticks: int = 0
    requests: int = 0
    encoded_frames: int = 0
    padded_frames: int = 0
    tracked_rows: int = 0
    prompted_rows: int = 0
    attention_calls: int = 0
    rejected: int = 0
    copies_to_host: int = 0
    failed_ticks: int = 0


class Sam2Future:
    """The pending result of one request."""

    def __init__(self, server: Sam2Server) -> None:
        self._server = server
        self._event = threading.Event()
        self._result: CameraResult | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> CameraResult:
        """Wait for the result (without a worker thread, run ticks until it is there)."""
        while not self._event.is_set() and not self._server.threaded:
            if not self._server.tick():
                raise RuntimeError("nothing pending for this result (was the request submitted?)")
        if not self._event.wait(timeout):
            raise TimeoutError("SAM2 server did not answer in time")
        if self._error is not None:
            raise self._error
        return self._result

    def _set(self, result: CameraResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._event.set()


@dataclass(slots=True, eq=False)
class _Request:
    camera: _Camera
    frame: np.ndarray | None
    prompts: tuple[Prompt, ...]
    remove: tuple[int, ...]
    reset: bool
    masks: bool
    future: Sam2Future
    submitted: float = field(default_factory=time.monotonic)


@dataclass(slots=True, eq=False)
class _Person:
    """A tracked person: their bank row and which slot holds each remembered frame."""

    row: int
    frames: PersonFrames = field(default_factory=PersonFrames)
    mask_slot: dict[int, int] = field(default_factory=dict)
    ptr_slot: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Camera:
    """A camera's streaming state, owned by the worker."""

    name: str
    bgr: bool
    region_masks: RegionMasks | None
    frame_index: int = -1
    frame: np.ndarray | None = None  # the current frame until it is encoded
    size: tuple[int, int] = (0, 0)  # (height, width)
    feats: list[torch.Tensor] | None = None  # the current frame's features, per level (1, C, h, w)
    people: dict[int, _Person] = field(default_factory=dict)
    epoch: int = 0
    pending: deque = field(default_factory=deque)
    busy: bool = False
    regions: torch.Tensor | None = None
    regions_size: tuple[int, int] = (0, 0)


@dataclass(slots=True, eq=False)
class _Output:
    """One person's low-res mask logits and score from this tick (tensors stay on the device)."""

    obj_id: int
    low_res: torch.Tensor  # (1, 1, h, w)
    score: torch.Tensor  # (1, 1)
    prompted: bool


class Sam2Camera:
    """A camera's handle on the server. Submit requests from one thread, in order."""

    def __init__(self, server: Sam2Server, state: _Camera) -> None:
        self._server = server
        self._state = state

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def people(self) -> tuple[int, ...]:
        """Ids the server tracks for this camera (as of the last finished request)."""
        return tuple(self._state.people)

    def submit(
        self,
        frame: np.ndarray | None = None,
        *,
        prompts: Sequence[Prompt] = (),
        remove: Sequence[int] = (),
        reset: bool = False,
        masks: bool = False,
    ) -> Sam2Future:
        """Queue a request; applied in this order: ``reset`` (forget everyone), ``remove`` ids,
        ``frame`` (HxWx3 uint8; becomes current and everyone is tracked on it), ``prompts`` on the
        current frame. ``masks``: return each person's mask crop."""
        return self._server._submit(self._state, frame, tuple(prompts), tuple(remove), reset, masks)

    def step(self, frame: np.ndarray, **kwargs) -> CameraResult:
        """Track everyone on ``frame`` (see :meth:`submit`) and wait for the result."""
        return self.submit(frame, **kwargs).result()

    def prompt(self, prompts: Sequence[Prompt], *, masks: bool = False) -> CameraResult:
        """Prompt people on the current frame and wait for their outputs."""
        return self.submit(prompts=prompts, masks=masks).result()

    def close(self) -> None:
        """Forget this camera's people (frees their share of the budget) and unregister it."""
        self.submit(reset=True).result()
        self._server._unregister(self._state)


class _Banks:
    """Preallocated device memory: mask memories (bf16, as SAM2 stores them) and object pointers.

    Row ``r`` of the person budget owns mask slots ``r*M .. r*M+M-1`` and pointer slots
    ``r*P .. r*P+P-1``.
    """

    def __init__(self, model, capacity: int, mask_slots: int, pointer_slots: int) -> None:
        side = model.image_size // model.backbone_stride
        device = model.device
        self.mask_slots, self.pointer_slots = mask_slots, pointer_slots
        self.maskmem = torch.zeros(capacity * mask_slots, model.mem_dim, side, side, dtype=torch.bfloat16, device=device)
        self.pointers = torch.zeros(capacity * pointer_slots, model.hidden_dim, device=device)
        self.free_rows = list(range(capacity - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.maskmem, self.pointers))

    def mask_index(self, person: _Person, frame: int) -> int:
        return person.row * self.mask_slots + person.mask_slot[frame]

    def pointer_index(self, person: _Person, frame: int) -> int:
        return person.row * self.pointer_slots + person.ptr_slot[frame]

    @staticmethod
    def assign(slots: dict[int, int], keep: set[int], frame: int, capacity: int) -> None:
        """Free the slots of frames not in ``keep`` and give ``frame`` a slot (its own if it has one)."""
        for t in [t for t in slots if t not in keep]:
            del slots[t]
        if frame not in slots:
            used = set(slots.values())
            slots[frame] = next(i for i in range(len(slots) + 1) if i not in used)
            assert slots[frame] < capacity, "memory planner kept more frames than the bank has slots"


class Sam2Server:
    """Serves every camera's SAM2 tracking from one worker (see the module docstring).

    Args:
        model: from ``sam2.build_sam.build_sam2_video_predictor``; used as the model only.
        max_people: person budget over all cameras (bank rows). Prompts for new people past it
            are refused (``CameraResult.rejected``).
        max_cond_frames, num_frames: as for the session (most recent conditioning frames kept).
        autocast_dtype: e.g. ``torch.bfloat16`` (CUDA).
        encoder_batches: encoder batch buckets; a tick's frames are padded up to the next one
            (more than the largest are split).
        max_batch: most people per memory-attention / decoder forward (None: no cap).
        metrics: a :class:`daemon.ops.metrics.Metrics` for queue wait, tick time, people, budget.
        thread: run a worker thread; without one, :meth:`Sam2Future.result` runs the ticks.
    """

    def __init__(
        self,
        model,
        *,
        max_people: int = 64,
        max_cond_frames: int = 2,
        num_frames: int = 16,
        autocast_dtype: torch.dtype | None = None,
        encoder_batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
        max_batch: int | None = None,
        metrics=None,
        thread: bool = True,
    ) -> None:
        buckets = sorted(set(encoder_batches))
        if max_people < 1 or not buckets or buckets[0] < 1 or (max_batch is not None and max_batch < 1):
            raise ValueError("needs max_people >= 1, encoder batch sizes >= 1 and max_batch >= 1")
        if model.num_maskmem < 1 or model.non_overlap_masks_for_mem_enc:
            raise ValueError("needs a model with mask memory and per-object memory encoding")
        self.model = model
        self.max_people = max_people
        self.encoder_batches = tuple(buckets)
        self.max_batch = max_batch
        self.autocast_dtype = autocast_dtype
        self.metrics = metrics
        self.planner = MemoryPlanner.for_model(model, num_frames=num_frames, max_cond_frames=max_cond_frames)
        self.banks = _Banks(model, max_people, self.planner.mask_slots, self.planner.pointer_slots)
        self.stats = ServerStats()
        self.on_attention: Callable[[list[tuple[str, int, int]]], None] | None = None  # tests: rows of the next call
        self._device = model.device
        self._pinned = self._device.type == "cuda"
        self._input = torch.zeros(buckets[-1], 3, model.image_size, model.image_size, device=self._device)
        self._top_pos: torch.Tensor | None = None  # (HW, 1, C) image position encoding, equal for all
        self._maskmem_pos: torch.Tensor | None = None  # (hw, mem_dim)
        self._top_size: tuple[int, int] | None = None
        self._cameras: list[_Camera] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.sam2_people_budget.set(max_people)
        if thread:
            self._thread = threading.Thread(target=self._run, name="sam2-server", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------------------- public
    @property
    def threaded(self) -> bool:
        return self._thread is not None

    @property
    def people(self) -> int:
        """People tracked over all cameras."""
        return self.max_people - len(self.banks.free_rows)

    def camera(self, name: str, *, region_masks: RegionMasks | None = None, bgr: bool = False) -> Sam2Camera:
        """Register a camera. ``bgr``: its frames are BGR (flipped on the device);
        ``region_masks(width, height)`` gives its (R, H, W) region masks for overlaps."""
        state = _Camera(name, bgr, region_masks)
        with self._cond:
            if self._closed:
                raise RuntimeError("SAM2 server is closed")
            self._cameras.append(state)
        return Sam2Camera(self, state)

    def _unregister(self, state: _Camera) -> None:
        with self._cond:
            if state in self._cameras:
                self._cameras.remove(state)

    def tick(self) -> int:
        """Serve what is pending now (one request per camera); returns how many were served."""
        with self._cond:
            batch = self._take()
        if batch:
            self._serve(batch)
        return len(batch)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; pending requests fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for cam in self._cameras:
                while cam.pending:
                    cam.pending.popleft().future._set(None, RuntimeError("SAM2 server closed"))

    # ----------------------------------------------------------------------------- queueing
    def _submit(self, cam: _Camera, frame, prompts, remove, reset, masks) -> Sam2Future:
        if frame is not None and (frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8):
            raise ValueError(f"camera {cam.name}: frames must be HxWx3 uint8, got {frame.shape} {frame.dtype}")
        future = Sam2Future(self)
        with self._cond:
            if self._closed:
                raise RuntimeError("SAM2 server is closed")
            if prompts and frame is None and cam.frame_index < 0 and not cam.pending:
                raise ValueError(f"camera {cam.name}: a prompt needs a frame first")
            if not (prompts or remove or reset or cam.people or cam.pending or cam.busy):
                # Nobody tracked and nothing asked: the frame only becomes current (no tick).
                self._new_frame(cam, frame)
                future._set(CameraResult(cam.frame_index, {}, epoch=cam.epoch))
                return future
            cam.pending.append(_Request(cam, frame, prompts, remove, reset, masks, future))
            self._cond.notify_all()
        return future

    def _take(self) -> list[_Request]:
        batch = []
        for cam in self._cameras:
            if cam.pending and not cam.busy:
                cam.busy = True
                batch.append(cam.pending.popleft())
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not any(c.pending and not c.busy for c in self._cameras):
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        self.stats.ticks += 1
        self.stats.requests += len(batch)
        if self.metrics is not None:
            for r in batch:
                self.metrics.sam2_queue_wait.labels(r.camera.name).observe(started - r.submitted)
        results, error = None, None
        try:
            with self._inference():
                results = self._compute(batch)
        except Exception as e:  # e.g. CUDA out of memory: these cameras start over
            log.exception("SAM2 tick failed for cameras %s; their people are dropped", [r.camera.name for r in batch])
            self.stats.failed_ticks += 1
            error = e
            for r in batch:
                self._reset(r.camera)
                r.camera.epoch += 1
                r.camera.feats = r.camera.frame = None
        with self._cond:
            for i, r in enumerate(batch):
                r.camera.busy = False
                if results is None:
                    failure = RuntimeError(f"SAM2 tick failed for camera {r.camera.name}: {error!r}")
                    failure.__cause__ = error
                    r.future._set(None, failure)
                else:
                    r.future._set(results[i])
            self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.sam2_tick_seconds.observe(time.monotonic() - started)
            self.metrics.sam2_people.set(self.people)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        dtype = self.autocast_dtype
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=dtype, enabled=dtype is not None):
            yield

    # ----------------------------------------------------------------------------- the tick
    def _new_frame(self, cam: _Camera, frame: np.ndarray | None) -> None:
        if frame is not None:
            cam.frame_index += 1
            cam.frame, cam.feats, cam.size = frame, None, (int(frame.shape[0]), int(frame.shape[1]))

    def _reset(self, cam: _Camera) -> None:
        for obj_id in list(cam.people):
            self._remove(cam, obj_id)

    def _remove(self, cam: _Camera, obj_id: int) -> None:
        person = cam.people.pop(obj_id, None)
        if person is not None:
            self.banks.free_rows.append(person.row)

    def _compute(self, batch: list[_Request]) -> list[CameraResult]:
        tracked: list[tuple[_Request, int, _Person]] = []
        prompted: list[tuple[_Request, Prompt, _Person]] = []
        rejected: dict[int, list[int]] = {}
        for i, r in enumerate(batch):
            cam = r.camera
            if r.reset:
                self._reset(cam)
            for obj_id in r.remove:
                self._remove(cam, obj_id)
            self._new_frame(cam, r.frame)
            if r.frame is not None:
                tracked += [(r, obj_id, person) for obj_id, person in cam.people.items()]
            for p in r.prompts:
                person = cam.people.get(p.obj_id)
                if cam.feats is None and cam.frame is None:  # its frame was lost with a failed tick
                    rejected.setdefault(i, []).append(p.obj_id)
                    continue
                if person is None:
                    if not self.banks.free_rows:
                        rejected.setdefault(i, []).append(p.obj_id)
                        continue
                    person = cam.people[p.obj_id] = _Person(self.banks.free_rows.pop())
                prompted.append((r, p, person))
        self.stats.rejected += sum(map(len, rejected.values()))
        if self.metrics is not None:
            for i, ids in rejected.items():
                self.metrics.sam2_people_rejected.labels(batch[i].camera.name).inc(len(ids))
        to_encode = list({id(r.camera): r.camera for r, *_ in tracked + prompted if r.camera.feats is None}.values())
        self._encode(to_encode)
        outputs: dict[int, list[_Output]] = {id(r): [] for r in batch}
        if tracked:
            self._track(tracked, outputs)
        if prompted:
            self._prompt(prompted, outputs)
        return self._finish(batch, outputs, rejected, {id(c) for c in to_encode})

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self._pinned:
            return tensor.pin_memory().to(self._device, non_blocking=True)
        return tensor.to(self._device)

    def _encode(self, cams: list[_Camera]) -> None:
        """Preprocess and encode the cameras' current frames, in bucket-sized batches."""
        largest = self.encoder_batches[-1]
        for start in range(0, len(cams), largest):
            chunk = cams[start : start + largest]
            bucket = next(b for b in self.encoder_batches if b >= len(chunk))
            for i, cam in enumerate(chunk):
                dev.preprocess([self._upload(cam.frame)], self.model.image_size, bgr=cam.bgr, out=self._input[i:])
            out = self.model.forward_image(self._input[:bucket])
            levels = out["backbone_fpn"][-self.model.num_feature_levels :]
            if self._top_pos is None:
                top_pos = out["vision_pos_enc"][-1]
                self._top_pos = top_pos[:1].flatten(2).permute(2, 0, 1).clone()
                self._top_size = tuple(top_pos.shape[-2:])
            for i, cam in enumerate(chunk):
                cam.feats = [level[i : i + 1] for level in levels]
                cam.frame = None
            self.stats.encoded_frames += len(chunk)
            self.stats.padded_frames += bucket - len(chunk)

    def _features(self, cams: list[_Camera], level: int) -> torch.Tensor:
        """(B, C, h, w) features of one level for a batch of rows (one camera per row)."""
        return torch.cat([cam.feats[level] for cam in cams])

    def _track(self, rows: list[tuple[_Request, int, _Person]], outputs: dict[int, list[_Output]]) -> None:
        """Step every tracked person: attention per memory layout, heads and memory encoder for all."""
        model, banks, planner = self.model, self.banks, self.planner
        plans = [planner.plan(person.frames, r.camera.frame_index) for r, _, person in rows]
        groups: dict[tuple[int, int], list[int]] = {}
        for k, plan in enumerate(plans):
            groups.setdefault(plan.layout, []).append(k)
        cap = self.max_batch or len(rows)
        chunks = [ks[s : s + cap] for ks in groups.values() for s in range(0, len(ks), cap)]
        # Host bookkeeping first (reads are indexed before the writes' slots are assigned); the
        # device reads happen before the writes in stream order.
        reads = []
        for ks in chunks:
            mask_idx = [banks.mask_index(rows[k][2], t) for k in ks for _, t in plans[k].maskmems]
            t_pos = [p for k in ks for p, _ in plans[k].maskmems]
            ptr_idx = [banks.pointer_index(rows[k][2], t) for k in ks for _, t in plans[k].pointers]
            dists = [d for k in ks for d, _ in plans[k].pointers]
            reads.append((mask_idx, t_pos, ptr_idx, dists))
        order = [k for ks in chunks for k in ks]
        writes_mask, writes_ptr = [], []
        for k in order:
            r, _, person = rows[k]
            now = r.camera.frame_index
            planner.tracked(person.frames, now)
            banks.assign(person.mask_slot, person.frames.with_mask(), now, banks.mask_slots)
            banks.assign(person.ptr_slot, person.frames.alive(), now, banks.pointer_slots)
            writes_mask.append(banks.mask_index(person, now))
            writes_ptr.append(banks.pointer_index(person, now))
        flat = [x for read in reads for part in read for x in part] + writes_mask + writes_ptr
        index = self._upload(np.asarray(flat, np.int64))
        # Everyone's top-level features, gathered once in ``order`` (the chunks one after another):
        # attention reads them per chunk, the memory encoder per decode slice.
        top_all = self._features([rows[k][0].camera for k in order], -1)
        pix_feats, offset, start = [], 0, 0
        for ks, (mask_idx, t_pos, ptr_idx, dists) in zip(chunks, reads):
            parts = []
            for part in (mask_idx, t_pos, ptr_idx, dists):
                parts.append(index[offset : offset + len(part)])
                offset += len(part)
            batch, (slots, pointers) = len(ks), plans[ks[0]].layout
            maskmem = banks.maskmem.index_select(0, parts[0]).view(batch, slots, *banks.maskmem.shape[1:])
            ptrs = banks.pointers.index_select(0, parts[2]).view(batch, pointers, -1) if pointers else None
            memory, memory_pos, num_ptr_tokens = dev.memory_inputs(
                model, maskmem, self._maskmem_pos, parts[1].view(batch, slots), ptrs,
                parts[3].view(batch, pointers), planner.max_ptrs,
            )
            curr = top_all[start : start + batch].flatten(2).permute(2, 0, 1)
            start += batch
            if self.on_attention is not None:
                self.on_attention([(rows[k][0].camera.name, rows[k][0].camera.frame_index, rows[k][1]) for k in ks])
            pix_feats.append(
                dev.attend(model, curr, self._top_pos.expand(-1, batch, -1), memory, memory_pos, num_ptr_tokens, self._top_size)
            )
            self.stats.attention_calls += 1
        pix_feat = pix_feats[0] if len(pix_feats) == 1 else torch.cat(pix_feats)
        write_mask = index[offset : offset + len(order)]
        write_ptr = index[offset + len(order) :]
        for s in range(0, len(order), cap):
            ks = order[s : s + cap]
            cams = [rows[k][0].camera for k in ks]
            high_res = [self._features(cams, level) for level in range(model.num_feature_levels - 1)]
            low_res, high_res_masks, obj_ptr, scores = dev.decode(model, pix_feat[s : s + cap], high_res or None)
            top = top_all[s : s + cap].flatten(2).permute(2, 0, 1)
            maskmem, maskmem_pos = dev.encode_memory(model, top, self._top_size, high_res_masks, scores, from_points=False)
            self._store(write_mask[s : s + cap], write_ptr[s : s + cap], maskmem, maskmem_pos, obj_ptr)
            low_res = fill_holes(model, low_res)
            for j, k in enumerate(ks):
                r, obj_id, _ = rows[k]
                outputs[id(r)].append(_Output(obj_id, low_res[j : j + 1], scores[j : j + 1], False))
        self.stats.tracked_rows += len(rows)

    def _store(self, mask_index, ptr_index, maskmem, maskmem_pos, obj_ptr) -> None:
        if self._maskmem_pos is None:
            self._maskmem_pos = maskmem_position(maskmem_pos)
        self.banks.maskmem.index_copy_(0, mask_index, maskmem.to(torch.bfloat16))
        self.banks.pointers.index_copy_(0, ptr_index, obj_ptr.to(self.banks.pointers.dtype))

    def _prompt(self, rows: list[tuple[_Request, Prompt, _Person]], outputs: dict[int, list[_Output]]) -> None:
        """Prompts (conditioning frames) batched by prompt length."""
        model, banks = self.model, self.banks
        encoded = []
        for r, p, person in rows:
            height, width = r.camera.size
            coords, kinds = point_inputs(p.box, p.points, p.labels, width, height, model.image_size)
            now = r.camera.frame_index
            self.planner.prompted(person.frames, now)
            banks.assign(person.mask_slot, person.frames.with_mask(), now, banks.mask_slots)
            banks.assign(person.ptr_slot, person.frames.alive(), now, banks.pointer_slots)
            encoded.append((coords, kinds, banks.mask_index(person, now), banks.pointer_index(person, now)))
        groups: dict[int, list[int]] = {}
        for k, (coords, *_) in enumerate(encoded):
            groups.setdefault(len(coords), []).append(k)
        cap = self.max_batch or len(rows)
        for ks in (ks[s : s + cap] for ks in groups.values() for s in range(0, len(ks), cap)):
            cams = [rows[k][0].camera for k in ks]
            levels = [self._features(cams, level) for level in range(model.num_feature_levels)]
            feats = [x.flatten(2).permute(2, 0, 1) for x in levels]
            sizes = [tuple(x.shape[-2:]) for x in levels]
            coords = self._upload(np.stack([encoded[k][0] for k in ks]))
            kinds = self._upload(np.stack([encoded[k][1] for k in ks]))
            index = self._upload(np.asarray([encoded[k][2] for k in ks] + [encoded[k][3] for k in ks], np.int64))
            prompt = {"point_coords": coords, "point_labels": kinds}
            pos = [self._top_pos.expand(-1, len(ks), -1)]
            masks, maskmem, maskmem_pos, obj_ptr, scores = prompt_step(model, feats, pos, sizes, prompt)
            self._store(index[: len(ks)], index[len(ks) :], maskmem, maskmem_pos, obj_ptr)
            for j, k in enumerate(ks):
                r, p, _ = rows[k]
                outputs[id(r)].append(_Output(p.obj_id, masks[j : j + 1], scores[j : j + 1], True))
        self.stats.prompted_rows += len(rows)

    def _regions(self, cam: _Camera) -> torch.Tensor | None:
        if cam.region_masks is None:
            return None
        if cam.regions is None or cam.regions_size != cam.size:
            height, width = cam.size
            masks = np.asarray(cam.region_masks(width, height), bool).reshape(-1, height, width)
            cam.regions = self._upload(masks.astype(np.float32))  # float: overlaps are one matmul
            cam.regions_size = cam.size
        return cam.regions

    def _finish(self, batch, outputs, rejected, encoded) -> list[CameraResult]:
        """Post-process on the device, copy everything back at once, build the results."""
        with torch.autocast(self._device.type, enabled=False):  # pixel counts need fp32 matmuls
            host, layout = self._post_process(batch, outputs)
        results, offset = [], 0
        for i, (r, shape) in enumerate(zip(batch, layout)):
            people: dict[int, PersonResult] = {}
            if shape is not None:
                (n, cols), packed_shape = shape
                stats = host[offset : offset + n * cols * 4].view(np.float32).reshape(n, cols)
                offset += n * cols * 4
                packed = None
                if packed_shape is not None:
                    size = int(np.prod(packed_shape))
                    packed = host[offset : offset + size].reshape(packed_shape)
                    offset += size
                for j, out in enumerate(outputs[id(r)]):
                    people[out.obj_id] = _person_result(out, stats[j], None if packed is None else packed[j])
            cam = r.camera
            results.append(CameraResult(cam.frame_index, people, tuple(rejected.get(i, ())), id(cam) in encoded, cam.epoch))
        return results

    def _post_process(self, batch, outputs) -> tuple[np.ndarray, list]:
        """Per camera: masks at frame size, their statistics and (when asked) packed rows, all
        concatenated as bytes and copied to the host in one go. Returns (bytes, layout)."""
        parts, layout = [], []
        for r in batch:
            outs = outputs[id(r)]
            if not outs:
                layout.append(None)
                continue
            cam = r.camera
            low_res = torch.cat([o.low_res for o in outs]).float()
            logits = F.interpolate(low_res, size=cam.size, mode="bilinear", align_corners=False)
            if self.model.non_overlap_masks:
                logits = self.model._apply_non_overlapping_constraints(logits)
            masks = logits[:, 0] > 0
            scores = torch.cat([o.score for o in outs]).float()
            stats = torch.cat([scores, dev.mask_stats(masks, self._regions(cam))], dim=1)
            parts.append(stats.flatten().view(torch.uint8))
            packed = dev.pack_rows(masks) if r.masks else None
            if packed is not None:
                parts.append(packed.flatten())
            layout.append((stats.shape, None if packed is None else packed.shape))
        host = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.uint8)
        self.stats.copies_to_host += bool(parts)
        return host, layout


def _person_result(out: _Output, row: np.ndarray, packed: np.ndarray | None) -> PersonResult:
    """One row of the copied-back statistics (score, :data:`STAT_COLUMNS`, overlaps)."""
    score, (x1, y1, x2, y2, nonempty, foot_x, foot_y, area) = float(row[0]), row[1:9]
    if not nonempty:
        return PersonResult(out.obj_id, score, None, None, 0, tuple(0.0 for _ in row[9:]), prompted=out.prompted)
    box = (int(x1), int(y1), int(x2), int(y2))
    crop = None
    if packed is not None:
        crop = MaskCrop(box[0], box[1], np.unpackbits(packed[box[1] : box[3]], axis=1)[:, box[0] : box[2]].astype(bool))
    return PersonResult(
        out.obj_id, score, box, (float(foot_x), float(foot_y)), int(area), tuple(float(v) for v in row[9:]),
        crop, out.prompted,
    )
