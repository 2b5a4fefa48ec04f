"""Sam2Server against per-camera StreamingSam2Sessions, at the inputs and outputs of
``memory_attention`` (forward hooks), and proof that this check fails on broken variants.

The scenario: four cameras of different sizes, 24 steps, people entering at different steps
(box and point prompts), two re-anchors, a removal, a reset with a new entrant, and an idle
camera. The reference runs one session per camera with the server's device preprocessing; the
sessions themselves match the official predictor (test_sam2_session.py). Random weights, image
size 128, one CPU thread: mechanics and numerics only.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
av = pytest.importorskip("av")

import cv2  # noqa: E402

from daemon.ops.metrics import Metrics  # noqa: E402
from daemon.regions import mask_footprint  # noqa: E402
from daemon.tracking.sam2_memory import MemoryPlan, MemoryPlanner  # noqa: E402
from daemon.tracking.sam2_probe import AttentionProbe, Mismatch, compare_calls  # noqa: E402
from daemon.tracking.sam2_server import Prompt, Sam2Server  # noqa: E402
from daemon.tracking.sam2_session import StreamingSam2Session, points_from_box  # noqa: E402

STEPS = 24
SIZES = {"hall": (432, 768), "yard": (180, 320), "idle": (300, 400), "door": (320, 240)}  # (height, width)
PERSON, PILLAR, TABLE = (380, 40, 530, 400), (520, 0, 620, 260), (200, 150, 330, 330)  # 768x432 pixels
REGION = (300, 250, 600, 432)  # hall: a rectangle region, for the device-side overlaps


def _prompt(obj_id: int, box, camera: str, points: bool = False) -> Prompt:
    height, width = SIZES[camera]
    sx, sy = width / 768, height / 432
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if points:
        pts, labels = points_from_box(scaled)
        return Prompt(obj_id, points=pts, labels=labels)
    return Prompt(obj_id, box=scaled)


# (camera, step) -> actions, applied as: removals and resets, the frame, new people, re-anchors.
SCRIPT = {
    ("hall", 0): [("add", _prompt(1, PERSON, "hall"))],
    ("hall", 5): [("add", _prompt(2, TABLE, "hall", points=True))],
    ("hall", 8): [("reanchor", _prompt(1, PERSON, "hall"))],
    ("hall", 11): [("reanchor", _prompt(1, PILLAR, "hall"))],
    ("hall", 19): [("remove", 2)],
    ("yard", 2): [("add", _prompt(1, PERSON, "yard"))],
    ("yard", 10): [("reset", None), ("add", _prompt(3, PILLAR, "yard"))],
    ("door", 5): [("add", _prompt(4, PERSON, "door"))],
    ("door", 7): [("add", _prompt(5, TABLE, "door"))],
}


@pytest.fixture(scope="module")
def model(sam2_model):
    return sam2_model


@pytest.fixture(scope="module")
def frames(footage: Path) -> dict[str, list[np.ndarray]]:
    """STEPS footage frames (a person at the table) resized to each camera's size, RGB."""
    out = []
    with av.open(str(footage)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= 80:
                out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == STEPS:
                break
    return {cam: [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in out] for cam, (h, w) in SIZES.items()}


def region_masks(width: int, height: int) -> np.ndarray:
    mask = np.zeros((1, height, width), bool)
    sx, sy = width / 768, height / 432
    mask[0, round(REGION[1] * sy) : round(REGION[3] * sy), round(REGION[0] * sx) : round(REGION[2] * sx)] = True
    return mask


@pytest.fixture(scope="module")
def reference(model, frames):
    """The scenario through one session per camera: (attention calls, outputs), keyed by
    (camera, step, person)."""
    outputs = {}
    with AttentionProbe(model) as probe:
        for cam in SIZES:
            session = StreamingSam2Session(model, preprocess="device")
            session.on_attention = lambda rows, cam=cam: probe.rows([(cam, f, o) for f, o in rows])
            for step in range(STEPS):
                actions = SCRIPT.get((cam, step), [])
                for kind, arg in actions:
                    if kind == "remove":
                        session.remove_person(arg)
                    elif kind == "reset":
                        session.reset()
                step_out = session.step(frames[cam][step])
                for kind, p in actions:
                    if kind in ("add", "reanchor"):
                        step_out[p.obj_id] = session.add_person(p.obj_id, box=p.box, points=p.points, labels=p.labels)
                outputs.update({(cam, step, obj_id): out for obj_id, out in step_out.items()})
    return probe.calls, outputs


def run_server(server: Sam2Server, frames) -> tuple[dict, dict]:
    """The scenario through the server: ({(camera, step, person): PersonResult}, {(camera, step):
    [CameraResult, ...]})."""
    cams = {cam: server.camera(cam, region_masks=region_masks if cam == "hall" else None) for cam in SIZES}
    people, results = {}, {}
    for step in range(STEPS):
        first = {}
        for cam, client in cams.items():
            actions = SCRIPT.get((cam, step), [])
            first[cam] = client.submit(
                frames[cam][step],
                prompts=[p for kind, p in actions if kind == "add"],
                remove=[arg for kind, arg in actions if kind == "remove"],
                reset=any(kind == "reset" for kind, _ in actions),
                masks=True,
            )
        second = {}
        for cam, client in cams.items():  # re-anchors: after the step, like the tracker does
            reanchors = [p for kind, p in SCRIPT.get((cam, step), []) if kind == "reanchor"]
            if reanchors:
                second[cam] = client.submit(prompts=reanchors, masks=True)
        for cam in SIZES:
            for future in (first[cam], second.get(cam)):
                if future is not None:
                    result = future.result()
                    results.setdefault((cam, step), []).append(result)
                    people.update({(cam, step, obj_id): out for obj_id, out in result.people.items()})
    return people, results


def test_server_matches_per_camera_sessions(model, frames, reference):
    calls, expected = reference
    figures: dict[str, float] = {}
    checked = set()

    def check(key, call):
        checked.add(key)
        for name, value in compare_calls(key, calls[key], call).items():
            figures[name] = max(figures.get(name, 0.0), value)

    server = Sam2Server(model, max_people=8, encoder_batches=(1, 2, 4), thread=False)
    with AttentionProbe(model, on_call=check) as probe:
        server.on_attention = probe.rows
        people, results = run_server(server, frames)
    assert len(calls) == 90 and checked == set(calls)  # every person's every tracked step was compared
    assert figures["pointer"] <= 1e-6 and figures["feature"] <= 1e-4, figures

    assert people.keys() == expected.keys()
    nonempty = 0
    for key, out in people.items():
        ref = expected[key]
        assert out.score == pytest.approx(ref.score, abs=1e-5), key
        full = out.mask.full(ref.mask.shape[1], ref.mask.shape[0]) if out.mask else np.zeros_like(ref.mask)
        union = np.logical_or(full, ref.mask).sum()
        assert union == 0 or np.logical_and(full, ref.mask).sum() / union >= 0.999, key
        nonempty += bool(ref.mask.any()) and not ref.mask.all()
        if full.any():  # the device's post-processing equals the host's on the mask it returned
            ys, xs = np.nonzero(full)
            assert out.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and out.area == full.sum(), key
            assert out.footprint == pytest.approx(mask_footprint(full), abs=1e-3), key
        if key[0] == "hall":
            region = region_masks(*SIZES["hall"][::-1])[0]
            assert out.overlaps == pytest.approx(((full & region).sum() / max(full.sum(), 1),), abs=1e-6), key
    assert nonempty > 0.8 * len(people)  # the mask comparisons are not empty == empty

    # Nothing computed for the idle camera or before anyone entered; one copy back per tick.
    assert all(not r.people and not r.encoded for step in range(STEPS) for r in results[("idle", step)])
    assert not results[("door", 4)][0].encoded and results[("door", 5)][0].encoded
    encoded = sum(r.encoded for rs in results.values() for r in rs)
    assert server.stats.encoded_frames == encoded
    assert server.stats.copies_to_host <= server.stats.ticks
    # Batched across cameras: fewer memory-attention forwards than the sessions made.
    per_session_calls = len({(k[0], k[1], len(c.memory), c.num_ptr_tokens) for k, c in calls.items()})
    assert server.stats.attention_calls < per_session_calls
    assert server.people == 4  # hall: 1 (2 removed); yard: 3 (1 reset away); door: 4 and 5


class DropPointers(MemoryPlanner):
    """15 of 16 object pointers dropped."""

    def plan(self, person, now):
        plan = super().plan(person, now)
        return MemoryPlan(plan.maskmems, plan.pointers[:1])


class ReverseTemporalEncoding(MemoryPlanner):
    """Mask memories get their temporal positions in reverse order."""

    def plan(self, person, now):
        plan = super().plan(person, now)
        return replace(plan, maskmems=tuple((p and self.num_maskmem - p, t) for p, t in plan.maskmems))


class OneRecentMemory(MemoryPlanner):
    """Only the newest of the recent mask memories kept."""

    def plan(self, person, now):
        plan = super().plan(person, now)
        cond = [m for m in plan.maskmems if m[0] == 0]
        recent = [m for m in plan.maskmems if m[0] != 0]
        return replace(plan, maskmems=tuple(cond + recent[-1:]))


class DropConditioning(MemoryPlanner):
    """Conditioning mask memories dropped."""

    def plan(self, person, now):
        plan = super().plan(person, now)
        return replace(plan, maskmems=tuple(m for m in plan.maskmems if m[0] != 0))


class PointerDistanceOffByOne(MemoryPlanner):
    """Object pointer distances one frame too far."""

    def plan(self, person, now):
        plan = super().plan(person, now)
        return replace(plan, pointers=tuple((d + 1, t) for d, t in plan.pointers))


class FirstConditioningKept(MemoryPlanner):
    """The old cap: the first prompt kept forever, then the latest."""

    def prompted(self, person, now):
        person.recent.discard(now)
        person.masks.discard(now)
        person.cond.append(now)
        while len(person.cond) > self.max_cond_frames:
            demoted = person.cond.pop(1)
            person.recent.add(demoted)
            person.masks.add(demoted)
        self.forget(person, now)


def stale_features(server: Sam2Server) -> None:
    """A camera's features are not refreshed when a new frame arrives."""
    original = server._new_frame

    def new_frame(cam, frame):
        feats = cam.feats
        original(cam, frame)
        cam.feats = feats

    server._new_frame = new_frame


def rows_rotated(server: Sam2Server) -> None:
    """Rows of one batch get another camera's image features."""
    server._features = lambda cams, level: torch.cat([cam.feats[level] for cam in cams[1:] + cams[:1]])


def tracked_memory_not_written(server: Sam2Server) -> None:
    """A tracked step's mask memory is not stored (its bank slot keeps stale contents)."""
    original_track, original_store, tracking = server._track, server._store, []

    def track(rows, outputs):
        tracking.append(True)
        try:
            original_track(rows, outputs)
        finally:
            tracking.clear()

    def store(mask_index, ptr_index, maskmem, maskmem_pos, obj_ptr):
        if tracking:
            maskmem = server.banks.maskmem.index_select(0, mask_index)
        original_store(mask_index, ptr_index, maskmem, maskmem_pos, obj_ptr)

    server._track, server._store = track, store


PLANNER_MUTANTS = [DropPointers, ReverseTemporalEncoding, OneRecentMemory, DropConditioning, PointerDistanceOffByOne,
                   FirstConditioningKept]
SERVER_MUTANTS = [stale_features, rows_rotated, tracked_memory_not_written]


@pytest.mark.parametrize("mutant", PLANNER_MUTANTS + SERVER_MUTANTS, ids=lambda m: m.__name__)
def test_equivalence_check_fails_on_a_broken_server(model, frames, reference, mutant):
    """Mutation canaries: each deliberately broken variant must fail the memory-attention check."""
    calls, _ = reference
    server = Sam2Server(model, max_people=8, encoder_batches=(1, 2, 4), thread=False)
    if mutant in PLANNER_MUTANTS:
        server.planner = mutant.for_model(model, num_frames=16, max_cond_frames=2)
    else:
        mutant(server)
    with AttentionProbe(model, on_call=lambda key, call: compare_calls(key, calls[key], call)) as probe:
        server.on_attention = probe.rows
        with pytest.raises(RuntimeError) as failure:
            run_server(server, frames)
    assert isinstance(failure.value.__cause__, Mismatch), repr(failure.value)


def test_person_budget_is_shared_by_all_cameras(model, frames):
    metrics = Metrics()
    server = Sam2Server(model, max_people=2, thread=False, metrics=metrics)
    hall, yard = server.camera("hall"), server.camera("yard")
    out = hall.step(frames["hall"][0], prompts=[_prompt(1, PERSON, "hall"), _prompt(2, PILLAR, "hall")])
    assert sorted(out.people) == [1, 2] and server.people == 2
    refused = yard.step(frames["yard"][0], prompts=[_prompt(7, PERSON, "yard")])
    assert refused.rejected == (7,) and not refused.people and yard.people == ()
    assert metrics.sam2_people_rejected.labels("yard")._value.get() == 1
    hall.submit(frames["hall"][1], remove=[2]).result()
    assert server.people == 1 and hall.people == (1,)
    assert sorted(yard.step(frames["yard"][1], prompts=[_prompt(7, PERSON, "yard")]).people) == [7]
    assert metrics.sam2_people._value.get() == 2 and metrics.sam2_people_budget._value.get() == 2
    assert metrics.sam2_queue_wait.labels("yard")._sum.get() >= 0 and metrics.sam2_tick_seconds._sum.get() > 0
    hall.close()
    assert server.people == 1


def test_threaded_cameras_batch_and_match_the_sessions(model, frames, reference):
    """Three camera threads at once: ticks serve several cameras, results still match."""
    _, expected = reference
    server = Sam2Server(model, max_people=8, encoder_batches=(1, 2, 4))
    errors, got = [], {}

    def camera(cam: str) -> None:
        try:
            client = server.camera(cam)
            for step in range(8):
                prompts = [p for kind, p in SCRIPT.get((cam, step), []) if kind == "add"]
                for obj_id, out in client.step(frames[cam][step], prompts=prompts).people.items():
                    got[(cam, step, obj_id)] = out
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=camera, args=(cam,)) for cam in ("hall", "yard", "door")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    server.close()
    assert not errors, errors
    assert got and got.keys() == {k for k in expected if k[0] in ("hall", "yard", "door") and k[1] < 8}
    for key, out in got.items():
        assert out.score == pytest.approx(expected[key].score, abs=1e-5), key
        assert out.mask is None  # not asked for
    assert server.stats.requests > server.stats.ticks  # some ticks served several cameras


def test_failed_tick_drops_the_cameras_people_and_recovers(model, frames):
    server = Sam2Server(model, max_people=4, thread=False)
    hall = server.camera("hall")
    hall.step(frames["hall"][0], prompts=[_prompt(1, PERSON, "hall")])
    original = model.forward_image

    def broken(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    model.forward_image = broken
    try:
        with pytest.raises(RuntimeError, match="SAM2 tick failed for camera hall") as failure:
            hall.step(frames["hall"][1])
    finally:
        model.forward_image = original
    assert isinstance(failure.value.__cause__, torch.cuda.OutOfMemoryError)
    assert hall.people == () and server.people == 0 and server.stats.failed_ticks == 1
    again = hall.step(frames["hall"][2], prompts=[_prompt(1, PERSON, "hall")])
    assert sorted(again.people) == [1] and again.epoch == 1


def test_requests_are_validated_and_close_fails_pending(model, frames):
    server = Sam2Server(model, max_people=2, thread=False)
    cam = server.camera("hall")
    with pytest.raises(ValueError, match="prompt needs a frame"):
        cam.submit(prompts=[_prompt(1, PERSON, "hall")])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        cam.submit(frames["hall"][0].astype(np.float32))
    pending = cam.submit(frames["hall"][0], prompts=[_prompt(1, PERSON, "hall")])
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        pending.result()
    with pytest.raises(RuntimeError, match="closed"):
        server.camera("yard")
