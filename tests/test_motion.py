"""daemon.motion on the real sample footage: motion where people appear and walk, none in the still room."""

from __future__ import annotations

import av
import numpy as np
import pytest

from daemon.detector import PersonDetector
from daemon.geometry import box_iou
from daemon.motion import MotionDetector

# Observed on the footage (the detector on every 5th frame): the first detector frame that sees
# each of the six visitors, after an empty room; and stretches with nobody in the room.
APPEARS = [65, 230, 510, 745, 930, 1235]
EMPTY_AND_STILL = [range(1, 60), range(1372, 1394)]


@pytest.fixture(scope="module")
def frames(footage) -> list[np.ndarray]:
    with av.open(str(footage)) as c:
        return [vf.to_ndarray(format="bgr24") for vf in c.decode(video=0)]


def motion_of(frames, **kw) -> list:
    md = MotionDetector(**kw)
    return [md(f) for f in frames]


@pytest.fixture(scope="module")
def motion(frames) -> list:
    return motion_of(frames)


def test_every_visitor_sets_off_motion_before_the_detector_sees_them(motion):
    for k in APPEARS:
        assert any(m.moving for m in motion[k - 5 : k + 1]), f"no motion in the 5 frames up to {k}"


def test_no_motion_in_the_empty_still_room(motion):
    for stretch in EMPTY_AND_STILL:
        assert not any(motion[i].moving for i in stretch), [i for i in stretch if motion[i].moving]


def test_motion_is_where_the_walking_person_is(frames, motion, yolo_model):
    det = PersonDetector(str(yolo_model))
    checked = 0
    for k in APPEARS:
        for i in range(k, k + 20, 4):  # the visitor walks in
            people = det(frames[i])
            if not motion[i].moving or len(people) != 1:
                continue
            checked += 1
            assert box_iou(people.xyxy, motion[i].boxes).max() > 0.1, (i, people.xyxy, motion[i].boxes)
    assert checked >= 12


def test_a_blind_detector_fails_these_checks(frames):
    """The checks above can fail: with an impossible threshold nothing is ever moving."""
    blind = motion_of(frames[: APPEARS[0] + 1], threshold=255)
    assert not any(m.moving for m in blind[APPEARS[0] - 5 :])


def test_lighting_change_resets_the_background(frames):
    md = MotionDetector()
    md(frames[10])
    dark = (frames[11] // 2).astype(np.uint8)
    m = md(dark)
    assert m.moving and m.global_change and m.changed > 0.5
    assert md(dark).moving is False, "the dark frame is the new background"
    md.reset()
    assert md(frames[12]).moving is False, "after reset the next frame only sets the background"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        MotionDetector(threshold=0)
