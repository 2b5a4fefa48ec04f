"""Equivalence checks for SAM2 drivers at the inputs and outputs of ``memory_attention``.

Masks alone hide memory bugs (a tracker that forgets most of its memory still draws plausible
masks), so :class:`AttentionProbe` records, with a forward hook, what every person feeds
``memory_attention`` on every step — current image features and their positions, the memory
tokens (mask memories, then object pointers) with their positions, the pointer token count —
and what it returns. :func:`compare_calls` then holds two drivers to SAM2's own numerics:

* positional encodings (image and memory) equal; pointer token counts and memory layout equal;
* mask memories within one bfloat16 step (SAM2 stores them in bf16);
* object pointers within ``pointer_atol`` (1e-6);
* image features and the attention output within ``feature_atol`` (1e-4 by default; batch-size
  dependent kernels give ~1e-5 on a CPU).

Drivers tell the probe which (camera, frame, person) each batch row is through their
``on_attention`` callback (:meth:`AttentionProbe.rows`) just before each call.

Example:
    >>> import torch
    >>> a = torch.tensor([1.0, 256.0]); b = torch.tensor([1.0078125, 258.0])
    >>> within_bf16_step(a, b).tolist()   # one bf16 step at 1.0 is 2**-7, at 256 it is 2
    [True, True]
    >>> within_bf16_step(a, a + 0.01).tolist()
    [False, True]
    >>> within_bf16_step(torch.tensor([1e-5]), torch.tensor([1.1e-5])).tolist()   # below the floor
    [True]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["AttentionCall", "AttentionProbe", "Mismatch", "compare_calls", "within_bf16_step"]


class Mismatch(AssertionError):
    """Two drivers disagree at a ``memory_attention`` call (the message says where and how)."""


@dataclass(frozen=True, slots=True)
class AttentionCall:
    """One person's slice of one ``memory_attention`` call (float32, on the CPU)."""

    curr: torch.Tensor  # (HW, C) image features
    curr_pos: torch.Tensor  # (HW, C)
    memory: torch.Tensor  # (N, mem_dim): mask-memory tokens, then pointer tokens
    memory_pos: torch.Tensor  # (N, mem_dim)
    num_ptr_tokens: int
    output: torch.Tensor  # (HW, C)


def within_bf16_step(a: torch.Tensor, b: torch.Tensor, floor: float = 2.0**-12) -> torch.Tensor:
    """Elementwise: ``a`` and ``b`` differ by at most one bfloat16 step at their magnitude.

    Magnitudes below ``floor`` count as ``floor`` (one step there is 2**-19 ~ 1.9e-6): fp32
    noise of ~1e-6 from batch-size dependent kernels flips the bf16 rounding of tiny values by
    several of their own (tiny) steps.
    """
    magnitude = torch.maximum(a.abs(), b.abs()).clamp(min=floor)
    step = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)  # bf16 keeps 8 significant bits
    return (a - b).abs() <= step


class AttentionProbe:
    """Records every person's :class:`AttentionCall` from a model's ``memory_attention``.

    ``on_call(key, call)`` receives each person's call as it happens (e.g. to compare online and
    stop at the first mismatch); without it, calls are kept in :attr:`calls` by key. Use as a
    context manager (removes the hook).
    """

    def __init__(self, model, on_call: Callable[[Hashable, AttentionCall], None] | None = None) -> None:
        self.calls: dict[Hashable, AttentionCall] = {}
        self.on_call = on_call
        self._pending: list[Hashable] | None = None
        self._handle = model.memory_attention.register_forward_hook(self._hook, with_kwargs=True)

    def rows(self, keys: Iterable[Hashable]) -> None:
        """The keys of the next call's batch rows, in order (a driver's ``on_attention``)."""
        self._pending = list(keys)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> AttentionProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hook(self, module, args, kwargs, output) -> None:
        keys, self._pending = self._pending, None
        if keys is None:
            raise RuntimeError("memory_attention ran without rows(): the driver must name its batch rows")
        curr, curr_pos = kwargs["curr"], kwargs["curr_pos"]
        curr = curr[0] if isinstance(curr, list) else curr
        curr_pos = curr_pos[0] if isinstance(curr_pos, list) else curr_pos
        if curr.shape[1] != len(keys):
            raise RuntimeError(f"memory_attention batch of {curr.shape[1]} but {len(keys)} rows named")
        for b, key in enumerate(keys):
            call = AttentionCall(
                *(t[:, b].detach().float().cpu().clone() for t in (curr, curr_pos, kwargs["memory"], kwargs["memory_pos"])),
                int(kwargs.get("num_obj_ptr_tokens", 0)),
                output[:, b].detach().float().cpu().clone(),
            )
            if self.on_call is not None:
                self.on_call(key, call)
            else:
                self.calls[key] = call


def compare_calls(
    key: Hashable, ref: AttentionCall, got: AttentionCall, *, pointer_atol: float = 1e-6, feature_atol: float = 1e-4
) -> dict[str, float]:
    """Raise :class:`Mismatch` unless ``got`` matches ``ref`` (see the module docstring).

    Returns the largest differences seen (for reports): ``maskmem_steps`` (fraction of mask-memory
    values off by more than zero), ``pointer``, ``feature``, ``output``.
    """
    if ref.memory.shape != got.memory.shape or ref.num_ptr_tokens != got.num_ptr_tokens:
        raise Mismatch(
            f"{key}: memory layout {tuple(got.memory.shape)} with {got.num_ptr_tokens} pointer tokens, "
            f"expected {tuple(ref.memory.shape)} with {ref.num_ptr_tokens}"
        )
    if not torch.equal(ref.curr_pos, got.curr_pos):
        raise Mismatch(f"{key}: image positional encodings differ")
    if not torch.equal(ref.memory_pos, got.memory_pos):
        diff = (ref.memory_pos - got.memory_pos).abs()
        token = int(diff.amax(dim=1).argmax())
        raise Mismatch(f"{key}: memory positional encodings differ (max {float(diff.max()):.3g} at token {token})")
    spatial = ref.memory.shape[0] - ref.num_ptr_tokens
    ok = within_bf16_step(ref.memory[:spatial], got.memory[:spatial])
    if not bool(ok.all()):
        raise Mismatch(f"{key}: mask memories differ by more than one bf16 step ({int((~ok).sum())} values)")
    figures = {
        "maskmem_steps": float((ref.memory[:spatial] != got.memory[:spatial]).float().mean()) if spatial else 0.0,
        "pointer": _max_abs(ref.memory[spatial:], got.memory[spatial:]),
        "feature": _max_abs(ref.curr, got.curr),
        "output": _max_abs(ref.output, got.output),
    }
    if figures["pointer"] > pointer_atol:
        raise Mismatch(f"{key}: object pointers differ by {figures['pointer']:.3g} > {pointer_atol}")
    for name in ("feature", "output"):
        if figures[name] > feature_atol:
            raise Mismatch(f"{key}: {name}s differ by {figures[name]:.3g} > {feature_atol}")
    return figures


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0
