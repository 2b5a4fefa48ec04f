"""SAM2 compute on the device, shared by the per-camera session and the multi-camera server.

Stages exchange plain tensors; nothing here synchronises with the host.

* :func:`preprocess` — HxWx3 uint8 frames to the model's normalised SxS input on the device,
  resized like sam2's JPEG loader (PIL bicubic: separable passes rounded to uint8; for common
  camera sizes within one grey level of PIL on < 0.05% of values, at worst a few grey levels).
* :func:`memory_inputs` — a batch of people's mask memories, temporal positions, object pointers
  and pointer distances as ``memory_attention``'s (memory, memory_pos, pointer tokens), token for
  token as ``SAM2Base._prepare_memory_conditioned_features`` builds them.
* :func:`attend`, :func:`decode`, :func:`encode_memory` — memory attention, SAM heads and memory
  encoder of a tracking step on a batch of people (``SAM2Base._track_step`` without the memory
  selection).
* :func:`mask_stats`, :func:`pack_rows` — post-processing: each mask's box, footprint, area,
  overlap with region masks; masks bit-packed per row for a compact copy back.

Example (random weights; shapes only):

    >>> import numpy as np, torch
    >>> frame = torch.from_numpy(np.full((6, 8, 3), 255, np.uint8))
    >>> image = preprocess([frame], 4)
    >>> image.shape, round(float(image[0, 0, 0, 0]), 3)   # white, normalised with ImageNet stats
    (torch.Size([1, 3, 4, 4]), 2.249)
    >>> masks = torch.zeros(1, 5, 9, dtype=torch.bool); masks[0, 1:4, 2:5] = True
    >>> mask_stats(masks, None)[0].tolist()   # x1, y1, x2, y2, non-empty, foot x, foot y, area
    [2.0, 1.0, 5.0, 4.0, 1.0, 3.0, 3.0, 9.0]
    >>> pack_rows(masks).shape                # 9 columns -> 2 bytes per row
    torch.Size([1, 5, 2])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import get_1d_sine_pe

__all__ = [
    "STAT_COLUMNS",
    "attend",
    "decode",
    "encode_memory",
    "mask_stats",
    "memory_inputs",
    "pack_rows",
    "preprocess",
]

# sam2.utils.misc.load_video_frames normalisation (ImageNet mean/std).
_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)

STAT_COLUMNS = ("x1", "y1", "x2", "y2", "nonempty", "foot_x", "foot_y", "area")
"""The columns of :func:`mask_stats` before the per-region overlaps."""


def preprocess(
    frames: Sequence[torch.Tensor], image_size: int, *, bgr: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HxWx3 uint8 frames (on the device, any sizes) -> (N, 3, S, S) float32, normalised.

    Resizes like PIL's ``Image.resize`` (bicubic with antialiasing, horizontal pass then
    vertical, each rounded to uint8), which is what sam2's video loader feeds the model. ``bgr``
    frames are flipped to RGB on the device. Writes into ``out[:N]`` when given.
    """
    if out is None:
        out = torch.empty(len(frames), 3, image_size, image_size, device=frames[0].device)
    mean, std, _ = _constants(out.device)
    for i, frame in enumerate(frames):
        image = frame.permute(2, 0, 1)[None].float()
        if bgr:
            image = image.flip(1)
        height, width = image.shape[2:]
        # Separable passes rounded to uint8 like PIL; the installed Pillow runs the vertical pass
        # first when its kernel is the wider one (measured), otherwise the horizontal one.
        if _kernel(height, image_size) > _kernel(width, image_size):
            passes = ((image_size, width), (image_size, image_size))
        else:
            passes = ((height, image_size), (image_size, image_size))
        for size in passes:
            if tuple(image.shape[2:]) != size:
                image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
                image = image.round_().clamp_(0, 255)
        out[i] = (image[0] / 255.0 - mean) / std
    return out[: len(frames)]


def _kernel(size_in: int, size_out: int) -> int:
    """Half-width of PIL's bicubic kernel for one axis (support 2, widened when reducing)."""
    return math.ceil(2 * max(size_in / size_out, 1.0))


def memory_inputs(
    model,
    maskmem: torch.Tensor,
    maskmem_pos: torch.Tensor,
    t_pos: torch.Tensor,
    pointers: torch.Tensor | None,
    distances: torch.Tensor | None,
    max_ptrs: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``memory_attention``'s (memory, memory_pos, pointer token count) for B people of one layout.

    Args:
        maskmem: (B, S, mem_dim, h, w) mask memories (bf16 as SAM2 stores them), S slots each.
        maskmem_pos: (h*w, mem_dim) the memory encoder's spatial encoding (equal for all).
        t_pos: (B, S) int64 temporal position of each slot (0 = conditioning frame).
        pointers: (B, P, hidden_dim) object pointers, or None; distances: (B, P) int64 frame
            distances; ``max_ptrs`` normalises them (``min(num_frames, max_obj_ptrs) ``).
    """
    batch, slots = t_pos.shape
    memory = [maskmem.flatten(3).permute(1, 3, 0, 2).flatten(0, 1)]  # (S*hw, B, mem_dim)
    tpos_enc = model.maskmem_tpos_enc[model.num_maskmem - 1 - t_pos].reshape(batch, slots, 1, model.mem_dim)
    memory_pos = [(maskmem_pos + tpos_enc).permute(1, 2, 0, 3).flatten(0, 1)]
    num_ptr_tokens = 0
    if pointers is not None and pointers.shape[1]:
        ptrs = pointers.transpose(0, 1)  # (P, B, hidden)
        if model.add_tpos_enc_to_obj_ptrs:
            tpos_dim = model.hidden_dim if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
            sine = get_1d_sine_pe(distances / (max_ptrs - 1), dim=tpos_dim)  # elementwise: batch-invariant
            # Projected per person, as SAM2 does: a GEMM's rounding depends on its row count, and
            # the encodings must not depend on who else shares the batch.
            ptr_pos = torch.stack([model.obj_ptr_tpos_proj(row) for row in sine], dim=1)  # (P, B, mem_dim)
        else:
            ptr_pos = ptrs.new_zeros(ptrs.shape[0], batch, model.mem_dim)
        split = model.hidden_dim // model.mem_dim  # a pointer becomes `split` memory tokens
        ptrs = ptrs.reshape(-1, batch, split, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        memory.append(ptrs)
        memory_pos.append(ptr_pos.repeat_interleave(split, dim=0))
        num_ptr_tokens = ptrs.shape[0]
    return torch.cat(memory), torch.cat(memory_pos), num_ptr_tokens


def attend(
    model,
    curr: torch.Tensor,
    curr_pos: torch.Tensor,
    memory: torch.Tensor,
    memory_pos: torch.Tensor,
    num_ptr_tokens: int,
    size: tuple[int, int],
) -> torch.Tensor:
    """Memory attention: (HW, B, C) current features + memory -> (B, C, H, W) conditioned features."""
    pix_feat = model.memory_attention(
        curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=num_ptr_tokens
    )
    return pix_feat.permute(1, 2, 0).reshape(curr.shape[1], model.hidden_dim, *size)


def decode(model, pix_feat: torch.Tensor, high_res: list[torch.Tensor] | None):
    """SAM heads of a tracking step: (low-res logits, high-res logits, object pointers, scores)."""
    _, _, _, low_res, high_res_masks, obj_ptr, scores = model._forward_sam_heads(
        backbone_features=pix_feat,
        high_res_features=high_res,
        multimask_output=model._use_multimask(False, None),
    )
    return low_res, high_res_masks, obj_ptr, scores


def encode_memory(model, top: torch.Tensor, size: tuple[int, int], high_res_masks, scores, *, from_points: bool):
    """Memory encoder on (HW, B, C) top-level features and (B, 1, S, S) mask logits."""
    return model._encode_new_memory([top], [size], high_res_masks, scores, is_mask_from_pts=from_points)


def mask_stats(masks: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """Per mask (N, H, W bool): :data:`STAT_COLUMNS` then the overlap with each region.

    Box ``x1, y1, x2, y2`` in pixel edges (x2/y2 exclusive; 0 for an empty mask); footprint: the
    centre of the mask's lowest row (``daemon.regions.mask_footprint``); overlap: the fraction of
    the mask inside each (R, H, W) region mask (0 for an empty mask).
    """
    n, height, width = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    nonempty = rows.any(dim=1)
    first_row = rows.to(torch.uint8).argmax(dim=1)
    last_row = height - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    first_col = cols.to(torch.uint8).argmax(dim=1)
    last_col = width - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    bottom = masks[torch.arange(n, device=masks.device), last_row].float()  # (N, W)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32)
    foot_x = (bottom * xs).sum(dim=1) / bottom.sum(dim=1).clamp(min=1)
    flat = masks.reshape(n, -1).float()
    area = flat.sum(dim=1)
    columns = [first_col, first_row, last_col + 1, last_row + 1, nonempty, foot_x, last_row, area]
    stats = torch.stack([c.float() for c in columns], dim=1) * nonempty[:, None]
    if regions is None or not len(regions):
        return stats
    inside = flat @ regions.reshape(len(regions), -1).float().T  # (N, R) pixel counts, exact in fp32
    return torch.cat([stats, inside / area.clamp(min=1)[:, None]], dim=1)


def pack_rows(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, ceil(W/8)) uint8, each row packed like ``np.packbits(axis=-1)``."""
    n, height, width = masks.shape
    padded = F.pad(masks.to(torch.uint8), (0, -width % 8))
    return (padded.reshape(n, height, -1, 8) * _constants(masks.device)[2]).sum(dim=-1, dtype=torch.uint8)


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, bit weights) on ``device``, made once: a pageable host-to-device copy syncs."""
    mean = torch.tensor(_IMG_MEAN, device=device)[:, None, None]
    std = torch.tensor(_IMG_STD, device=device)[:, None, None]
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)
    return mean, std, bits
