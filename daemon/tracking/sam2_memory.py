"""Which past frames a streaming SAM2 person attends to: the memory selection, as bookkeeping.

SAM2 (``SAM2Base._prepare_memory_conditioned_features``) builds each step's memory from a
person's conditioning (prompted) frames, the mask memories of the last ``num_maskmem - 1``
frames and the object pointers of the last ``max_ptrs - 1`` frames. :class:`MemoryPlanner`
reproduces that selection on frame indices only, so that both the per-camera session (memories in
dicts) and the server (memories in preallocated device banks) decide alike what to read, what to
keep and what to forget:

* :meth:`MemoryPlanner.plan` — the (temporal position, frame) mask-memory slots and
  (distance, frame) pointer slots of one step, in SAM2's token order;
* :meth:`MemoryPlanner.tracked` / :meth:`MemoryPlanner.prompted` — record a step's new memory and
  forget what the next step cannot read; conditioning frames are capped at ``max_cond_frames``,
  keeping the most recent ones (older ones become ordinary memories and soon age out).

Example (the tiny SAM2.1 settings: 7 mask memories, 16 pointers):

    >>> planner = MemoryPlanner(num_maskmem=7, max_ptrs=16, max_cond_frames=2)
    >>> person = PersonFrames()
    >>> planner.prompted(person, 0)          # entry prompt on frame 0
    >>> for t in range(1, 4):
    ...     plan = planner.plan(person, t)
    ...     planner.tracked(person, t)
    >>> plan.maskmems, plan.pointers         # frame 3 reads frames 0 (conditioning), 1 and 2
    (((0, 0), (5, 1), (6, 2)), ((3, 0), (1, 2), (2, 1)))
    >>> plan.layout
    (3, 3)
    >>> planner.prompted(person, 3); planner.prompted(person, 4)   # re-anchored twice: 3 and 4 kept
    >>> person.cond, sorted(person.masks)    # frame 0 is an ordinary memory now, until it ages out
    ([3, 4], [0, 1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sam2.modeling.sam2_utils import select_closest_cond_frames

__all__ = ["MemoryPlan", "MemoryPlanner", "PersonFrames"]


@dataclass(slots=True)
class PersonFrames:
    """The frames one person has memory of.

    ``cond``: conditioning (prompted) frames, oldest first; ``recent``: other frames whose object
    pointer is still readable; ``masks``: the frames among ``recent`` whose mask memory is too.
    """

    cond: list[int] = field(default_factory=list)
    recent: set[int] = field(default_factory=set)
    masks: set[int] = field(default_factory=set)

    def alive(self) -> set[int]:
        """Frames with any memory (a pointer, and maybe a mask memory)."""
        return set(self.cond) | self.recent

    def with_mask(self) -> set[int]:
        """Frames whose mask memory is kept."""
        return set(self.cond) | self.masks


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """One person's memory on one step, in SAM2's token order.

    ``maskmems``: (temporal position, frame), conditioning frames first (position 0), then
    positions 1..num_maskmem-1 (oldest first); ``pointers``: (signed frame distance, frame),
    conditioning frames first. People with equal :attr:`layout` (token counts) can share one
    batched memory-attention forward: positions and distances are per person.
    """

    maskmems: tuple[tuple[int, int], ...]
    pointers: tuple[tuple[int, int], ...]

    @property
    def layout(self) -> tuple[int, int]:
        return len(self.maskmems), len(self.pointers)


class MemoryPlanner:
    """SAM2's memory selection for streaming people (see the module docstring).

    Args:
        num_maskmem: the model's ``num_maskmem`` (1 current + mask memories of previous frames).
        max_ptrs: ``min(num_frames, max_obj_ptrs_in_encoder)`` (1: no pointers).
        max_cond_frames: conditioning frames kept per person (the most recent ones).
        stride: the model's ``memory_temporal_stride_for_eval``.
        max_cond_in_attn: the model's ``max_cond_frames_in_attn`` (-1: all).
    """

    def __init__(
        self, *, num_maskmem: int, max_ptrs: int, max_cond_frames: int, stride: int = 1, max_cond_in_attn: int = -1
    ) -> None:
        if num_maskmem < 1 or max_ptrs < 1 or max_cond_frames < 1 or stride < 1:
            raise ValueError("needs num_maskmem, max_ptrs, max_cond_frames and stride >= 1")
        self.num_maskmem = num_maskmem
        self.max_ptrs = max_ptrs
        self.max_cond_frames = max_cond_frames
        self.stride = stride
        self.max_cond_in_attn = max_cond_in_attn

    @classmethod
    def for_model(cls, model, *, num_frames: int, max_cond_frames: int) -> MemoryPlanner:
        """The planner for a ``SAM2Base`` model imitating a clip of ``num_frames`` frames."""
        max_ptrs = min(num_frames, model.max_obj_ptrs_in_encoder) if model.use_obj_ptrs_in_encoder else 1
        return cls(
            num_maskmem=model.num_maskmem,
            max_ptrs=max_ptrs,
            max_cond_frames=max_cond_frames,
            stride=model.memory_temporal_stride_for_eval,
            max_cond_in_attn=model.max_cond_frames_in_attn,
        )

    @property
    def mask_slots(self) -> int:
        """Most frames with a mask memory a person ever holds (conditioning + recent)."""
        return self.max_cond_frames + self.num_maskmem - 1

    @property
    def pointer_slots(self) -> int:
        """Most frames with an object pointer a person ever holds."""
        return self.max_cond_frames + self.max_ptrs - 1

    def maskmem_frame(self, now: int, t_rel: int) -> int:
        """The frame whose mask memory sits ``t_rel`` slots before ``now`` (SAM2's stride rule)."""
        if t_rel == 1:
            return now - 1
        return ((now - 2) // self.stride) * self.stride - (t_rel - 2) * self.stride

    def plan(self, person: PersonFrames, now: int) -> MemoryPlan:
        """What ``person`` attends to on frame ``now``, in SAM2's order.

        Every stored frame is in the past, so SAM2's "past pointers only" filter and signed vs
        unsigned pointer distances make no difference here.
        """
        cond = {t: t for t in person.cond}
        selected, unselected = select_closest_cond_frames(now, cond, self.max_cond_in_attn)
        maskmems = [(0, t) for t in selected]
        for t_pos in range(1, self.num_maskmem):
            t = self.maskmem_frame(now, self.num_maskmem - t_pos)
            if t in person.masks or t in unselected:
                maskmems.append((t_pos, t))
        pointers = []
        if self.max_ptrs > 1:
            pointers = [(now - t, t) for t in selected]
            for dist in range(1, self.max_ptrs):
                if now - dist in person.recent or now - dist in unselected:
                    pointers.append((dist, now - dist))
        return MemoryPlan(tuple(maskmems), tuple(pointers))

    def tracked(self, person: PersonFrames, now: int) -> None:
        """``person`` was tracked on ``now``: keep its new memory, forget what ages out."""
        person.recent.add(now)
        person.masks.add(now)
        self.forget(person, now)

    def prompted(self, person: PersonFrames, now: int) -> None:
        """``person`` was prompted on ``now``: it becomes their newest conditioning frame."""
        person.recent.discard(now)
        person.masks.discard(now)
        if now not in person.cond:
            person.cond.append(now)
        while len(person.cond) > self.max_cond_frames:
            oldest = person.cond.pop(0)  # demoted: read as an ordinary memory while recent enough
            person.recent.add(oldest)
            person.masks.add(oldest)
        self.forget(person, now)

    def forget(self, person: PersonFrames, now: int) -> None:
        """Drop what the step after ``now`` cannot read: old mask memories, then old pointers."""
        upcoming = now + 1
        readable = {self.maskmem_frame(upcoming, t_rel) for t_rel in range(1, self.num_maskmem)}
        person.masks &= readable
        oldest_ptr = upcoming - (self.max_ptrs - 1)
        person.recent = {t for t in person.recent if t in readable or t >= oldest_ptr}
