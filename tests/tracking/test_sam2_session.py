"""StreamingSam2Session (the per-camera reference): equivalence with the official
SAM2VideoPredictor at the inputs and outputs of ``memory_attention``, memory bounds, mechanics.

SAM2 runs with random weights (no checkpoint can be had here) at image_size 128 on one CPU
thread (tests/tracking/conftest.py): these tests check mechanics and numerical equivalence, never tracking quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")
av = pytest.importorskip("av")

from PIL import Image  # noqa: E402

from daemon.tracking import sam2_device  # noqa: E402
from daemon.tracking.sam2_probe import AttentionProbe, compare_calls  # noqa: E402
from daemon.tracking.sam2_session import (  # noqa: E402
    PersonOutput,
    SessionFullError,
    StreamingSam2Session,
    pil_preprocess,
    points_from_box,
)

FIRST_FRAME = 80  # a person stands at the table from here on
CLIP_FRAMES = 20  # >= 16, so the pointer window fills as in a long video
PERSON_BOX = [380, 40, 530, 400]  # the person at the table (768x432 footage)
PILLAR_BOX = [520, 0, 620, 260]
TABLE_BOX = [200, 150, 330, 330]


@pytest.fixture(scope="module")
def model(sam2_model):
    return sam2_model  # seed 0: masks cover part of the frame (neither empty nor full)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, footage: Path) -> tuple[Path, list[np.ndarray]]:
    """CLIP_FRAMES footage frames as a JPEG folder (the official predictor's input) and the
    same JPEGs decoded back to RGB arrays (the session's input): identical pixels on both sides."""
    folder = tmp_path_factory.mktemp("clip")
    with av.open(str(footage)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= FIRST_FRAME + CLIP_FRAMES:
                break
            if index >= FIRST_FRAME:
                frame.to_image().save(folder / f"{index - FIRST_FRAME:05d}.jpg", quality=95)
    frames = [np.array(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.jpg"))]
    return folder, frames


def assert_same_mask(a: np.ndarray, b: np.ndarray, where) -> None:
    """IoU >= 0.999; two empty masks are equal, one empty and one not are not."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return
    iou = np.logical_and(a, b).sum() / union
    assert iou >= 0.999, (where, iou)


def official_run(model, state, obj_id: int, start: int, prompt: dict, reverse: bool = False):
    """The official predictor tracking one object alone: ({frame: (mask, score)}, attention calls
    keyed (frame, obj_id))."""
    model.reset_state(state)
    model.add_new_points_or_box(state, frame_idx=start, obj_id=obj_id, **prompt)
    order = iter(range(start - 1, -1, -1) if reverse else range(start + 1, state["num_frames"]))
    with AttentionProbe(model) as probe:
        # The predictor calls memory attention once per frame after the prompt, in order.
        handle = model.memory_attention.register_forward_pre_hook(lambda *_: probe.rows([(next(order), obj_id)]))
        try:
            masks = {f: m[0, 0].numpy() > 0 for f, _, m in model.propagate_in_video(state, start, reverse=reverse)}
        finally:
            handle.remove()
    stored = state["output_dict_per_obj"][0]  # {"cond_frame_outputs": {...}, "non_cond_frame_outputs": {...}}
    scores = {f: float(out["object_score_logits"]) for by_frame in stored.values() for f, out in by_frame.items()}
    return {f: (masks[f], scores[f]) for f in masks}, probe.calls


class CallCounter:
    """Counts forwards of a module (e.g. how many batched memory-attention calls a step makes)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def test_points_from_box_is_the_notebook_heuristic():
    points, labels = points_from_box([100, 200, 140, 400])
    np.testing.assert_allclose(points, [[120, 300], [120, 310], [120, 270]])
    assert labels.tolist() == [1, 1, 1]


def test_step_outputs_shapes_ids_and_lazy_encoding(model, clip):
    _, frames = clip
    session = StreamingSam2Session(model)
    encoder = CallCounter(model.image_encoder)
    try:
        assert session.step(frames[0]) == {} and encoder.calls == 0  # nobody: no encoding
        with pytest.raises(ValueError):
            session.add_person(1)
        first = session.add_person(1, box=PERSON_BOX)
        points, labels = points_from_box(TABLE_BOX)
        session.add_person(2, points=points, labels=labels)
        assert encoder.calls == 1  # both prompts reuse the frame's features
        outputs = session.step(frames[1])
        assert encoder.calls == 2
    finally:
        encoder.close()
    assert isinstance(first, PersonOutput)
    assert session.people == (1, 2) and sorted(outputs) == [1, 2] and session.frame_index == 1
    for obj_id, out in outputs.items():
        assert out.mask.shape == frames[1].shape[:2] and out.mask.dtype == bool
        assert out.score == session.presence(obj_id) and out.present == (out.score > 0)
        assert 0 < out.mask.mean() < 1  # partial masks: the mask comparisons below can fail
        ys, xs = np.nonzero(out.mask)
        assert out.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_matches_official_predictor_at_memory_attention(model, clip):
    """People added on different frames, batched together by the session: every memory-attention
    input and output, mask and score matches the official predictor run per object."""
    folder, frames = clip
    points, labels = points_from_box(TABLE_BOX)
    prompts = {1: (0, {"box": PERSON_BOX}), 2: (3, {"points": points, "labels": labels})}
    state = model.init_state(str(folder))
    official, reference = {}, {}
    for obj_id, (start, prompt) in prompts.items():
        outputs, calls = official_run(model, state, obj_id, start, prompt)
        official.update({(f, obj_id): out for f, out in outputs.items()})
        reference.update(calls)

    session = StreamingSam2Session(model, num_frames=len(frames))
    attention = CallCounter(model.memory_attention)
    calls, compared = [], 0
    with AttentionProbe(model, on_call=lambda key, call: compare_calls(key, reference[key], call)) as probe:
        session.on_attention = probe.rows
        for index, frame in enumerate(frames):
            attention.calls = 0
            outputs = session.step(frame)
            calls.append(attention.calls)
            for obj_id, (start, prompt) in prompts.items():
                if start == index:
                    outputs[obj_id] = session.add_person(obj_id, **prompt)
            for obj_id, out in outputs.items():
                mask, score = official[(index, obj_id)]
                assert_same_mask(out.mask, mask, (index, obj_id))
                assert out.score == pytest.approx(score, abs=1e-5)
                compared += 1
    attention.close()
    assert compared == len(official) == 2 * len(frames) - 3
    assert len(reference) == compared - 2  # every tracked step was compared (not the prompts)
    # Separate forwards while person 2's memory fills, one batched forward once the layouts match.
    assert calls[4:] == [2] * 15 + [1], calls


def test_reverse_order_matches_official_reverse_propagation(model, clip):
    """Feeding buffered frames newest-first tracks backwards like propagate_in_video(reverse=True)."""
    folder, frames = clip
    last = 9
    state = model.init_state(str(folder))
    official, reference = official_run(model, state, 1, last, {"box": PERSON_BOX}, reverse=True)
    forward = StreamingSam2Session(model, num_frames=len(frames))
    session = forward.sibling()
    assert session.num_frames == forward.num_frames and session is not forward
    with AttentionProbe(model) as probe:
        session.on_attention = lambda rows: probe.rows([(last - step, obj_id) for step, obj_id in rows])
        for index in range(last, -1, -1):
            outputs = session.step(frames[index])
            if index == last:
                outputs = {1: session.add_person(1, box=PERSON_BOX)}
            assert_same_mask(outputs[1].mask, official[index][0], index)
            assert outputs[1].score == pytest.approx(official[index][1], abs=1e-5)
    assert probe.calls.keys() == reference.keys() and len(reference) == last
    for key, call in probe.calls.items():
        compare_calls(key, reference[key], call)


def test_memory_stays_flat_with_three_people(model, clip):
    _, frames = clip
    session = StreamingSam2Session(model)
    num_frames, warm_up = 22, 19  # the last person is added on frame 2; histories fill 16 frames later
    starts = {1: (0, PERSON_BOX), 2: (1, PILLAR_BOX), 3: (2, TABLE_BOX)}
    sizes = []
    for index in range(num_frames):
        session.step(frames[index % len(frames)])
        for obj_id, (start, box) in starts.items():
            if start == index:
                session.add_person(obj_id, box=box)
        sizes.append(session.memory_bytes())
        for person in session._people.values():
            assert len(person.frames.cond) == 1
            assert len(person.frames.recent) <= 15
            assert len(person.frames.masks) <= model.num_maskmem - 1
            assert set(person.memory) == person.frames.alive()
    assert len(set(sizes[warm_up:])) == 1, sizes
    for obj_id in starts:
        session.remove_person(obj_id)
    # per person exactly: 1 conditioning + 6 recent bf16 mask memories (64x8x8) + 16 pointers
    per_person = (1 + 6) * 64 * 8 * 8 * 2 + (1 + 15) * 256 * 4
    assert sizes[-1] - session.memory_bytes() == 3 * per_person


def test_reanchoring_keeps_the_most_recent_conditioning_frames(model, clip):
    _, frames = clip
    session = StreamingSam2Session(model, max_cond_frames=2)
    session.step(frames[0])
    session.add_person(1, box=PERSON_BOX)
    for index in range(1, 4):
        assert sorted(session.step(frames[index])) == [1]
    session.add_person(2, box=PILLAR_BOX)
    assert sorted(session.step(frames[4])) == [1, 2]
    session.remove_person(1)
    with pytest.raises(KeyError):
        session.remove_person(1)
    assert sorted(session.step(frames[5])) == [2] and session.people == (2,)
    session.add_person(1, box=TABLE_BOX)  # a removed id comes back as a new person
    assert sorted(session.step(frames[6])) == [1, 2]
    for index in range(7, 10):  # re-prompting person 2 on three frames: the latest two kept
        session.step(frames[index])
        session.add_person(2, box=PILLAR_BOX)
    frames_2 = session._people[2].frames
    assert frames_2.cond == [8, 9]
    assert {3, 7} <= frames_2.recent and 7 in frames_2.masks  # demoted to ordinary memories
    assert sorted(session.step(frames[10])) == [1, 2]
    session.reset()
    assert session.people == () and session.step(frames[11]) == {} and session.frame_index == 11


def test_max_batch_splits_forwards_without_changing_results(model, clip):
    _, frames = clip
    sessions = {size: StreamingSam2Session(model, max_batch=size) for size in (None, 2)}
    attention = CallCounter(model.memory_attention)
    try:
        for index in range(3):
            outputs = {}
            for size, session in sessions.items():
                attention.calls = 0
                outputs[size] = session.step(frames[index])
                assert attention.calls == (index > 0) * {None: 1, 2: 2}[size]
                if index == 0:
                    for obj_id, box in enumerate((PERSON_BOX, PILLAR_BOX, TABLE_BOX)):
                        session.add_person(obj_id, box=box)
            for obj_id, out in outputs[None].items():
                assert_same_mask(out.mask, outputs[2][obj_id].mask, obj_id)
    finally:
        attention.close()


def test_max_people_and_prompt_errors(model, clip):
    _, frames = clip
    session = StreamingSam2Session(model, max_people=2)
    with pytest.raises(RuntimeError):
        session.add_person(1, box=PERSON_BOX)  # no current frame yet
    session.step(frames[0])
    session.add_person(1, box=PERSON_BOX)
    session.add_person(2, box=PILLAR_BOX)
    with pytest.raises(SessionFullError):
        session.add_person(3, box=TABLE_BOX)
    with pytest.raises(ValueError):
        session.add_person(2, points=[[10, 10]])  # points without labels
    session.add_person(2, box=TABLE_BOX)  # re-anchoring a tracked id is always allowed
    session.remove_person(1)
    session.add_person(3, box=TABLE_BOX)
    assert session.people == (2, 3)
    with pytest.raises(ValueError, match="preprocess"):
        StreamingSam2Session(model, preprocess="gpu")


@pytest.mark.parametrize("size", [(432, 768), (180, 320), (1080, 1920), (480, 270), (300, 200)])
def test_device_preprocessing_is_within_one_grey_level_of_pil(clip, size):
    """The server's device-side resize (uint8 upload, two rounded bicubic passes) against sam2's
    PIL loader, for frames smaller and larger than the model input, landscape and portrait."""
    _, frames = clip
    frame = np.array(Image.fromarray(frames[0]).resize(size[::-1]))
    for image_size in (128, 512):
        pil = pil_preprocess(frame, image_size, torch.device("cpu"))
        dev = sam2_device.preprocess([torch.from_numpy(frame)], image_size)
        grey_level = (1 / 255) / 0.224  # one uint8 step after normalisation (smallest std: 0.224)
        diff = (pil - dev).abs()
        assert float(diff.max()) <= grey_level + 1e-6
        assert float((diff > 1e-5).float().mean()) < 1e-3
        bgr = sam2_device.preprocess([torch.from_numpy(np.ascontiguousarray(frame[..., ::-1]))], image_size, bgr=True)
        assert torch.equal(bgr, dev)
