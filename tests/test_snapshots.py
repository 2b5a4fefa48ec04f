"""Entry snapshots by event id: the JPEG comment, retention by age and size, the HTTP route."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid

import cv2
import jsonschema
import numpy as np
import pytest
from PIL import Image

from daemon.events import Event, json_schema
from daemon.ops.httpd import OpsServer
from daemon.snapshots import COMMENT_PREFIX, SnapshotStore, jpeg_comment, tag_jpeg


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
    return buf.tobytes()


def event(eid: str | None = None) -> Event:
    return Event(eid or str(uuid.uuid4()), 1, "entry", "hall", "table", 1, 10, 1.0, "2024-01-01T00:00:00.000Z",
                 [0, 0, 1, 1], [0.5, 1], 0.9)


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_comment_is_read_by_image_libraries_and_the_picture_is_unchanged():
    raw = jpeg(1)
    tagged = tag_jpeg(raw, COMMENT_PREFIX + "abc")
    assert jpeg_comment(tagged) == COMMENT_PREFIX + "abc" and jpeg_comment(raw) is None
    assert Image.open(io.BytesIO(tagged)).info["comment"] == (COMMENT_PREFIX + "abc").encode()
    a = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(a, b)
    assert tag_jpeg(b"not a jpeg", "x") == b"not a jpeg"


def test_retention_by_age_and_by_size(tmp_path):
    clock = Clock()
    one = len(tag_jpeg(jpeg(0), COMMENT_PREFIX + str(uuid.uuid4())))
    store = SnapshotStore(tmp_path, keep_days=1, keep_mb=3.5 * one / 2**20, base_url="http://x", clock=clock)
    ids = []
    for i in range(3):
        e, _ = store.attach(event(), jpeg(0))
        ids.append(e.id)
        clock.t += 60
    assert len(store) == 3 and all(store.get(i) for i in ids)
    e4, _ = store.attach(event(), jpeg(0))  # 4 would exceed 3.5 snapshots' worth: the oldest goes
    assert store.get(ids[0]) is None and not (tmp_path / f"{ids[0]}.jpg").exists()
    assert [store.get(i) is not None for i in ids[1:] + [e4.id]] == [True, True, True]
    assert store.bytes <= store.max_bytes
    clock.t += 86400 - 60  # ids[1] is now older than a day; the others not
    assert store.get(ids[1]) is None and store.get(ids[2]) is not None
    # A restart finds what is on disk (oldest first by file time).
    again = SnapshotStore(tmp_path, keep_days=3650, keep_mb=100, base_url="http://x")
    assert sorted(p.stem for p in tmp_path.glob("*.jpg")) == sorted([ids[2], e4.id])
    assert again.get(e4.id) == store.get(e4.id)


def test_nothing_is_kept_without_a_listener(tmp_path):
    store = SnapshotStore(tmp_path / "s", keep_days=1, keep_mb=1, base_url=None)
    e, tagged = store.attach(event(), jpeg(0))
    assert e.snapshot_url is None and jpeg_comment(tagged) == COMMENT_PREFIX + e.id  # still tagged
    assert not (tmp_path / "s").exists()
    assert store.attach(e, None) == (e, None)  # exits have no snapshot


def test_served_by_event_id_on_the_listener_and_linked_from_the_event(tmp_path):
    srv = OpsServer("127.0.0.1:0")
    srv.start()
    try:
        store = SnapshotStore(tmp_path, keep_days=1, keep_mb=10, base_url=srv.url)
        store.mount(srv)
        e, tagged = store.attach(event(), jpeg(2))
        assert e.snapshot_url == f"{srv.url}/events/{e.id}/snapshot.jpg"
        with urllib.request.urlopen(e.snapshot_url) as r:
            assert r.read() == tagged and r.headers["Content-Type"] == "image/jpeg"
        jsonschema.Draft202012Validator(json_schema(), format_checker=jsonschema.FormatChecker()).validate(
            json.loads(e.to_json()))
        for bad in (str(uuid.uuid4()), "..%2F..%2Fetc%2Fpasswd", "not-an-id"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{srv.url}/events/{bad}/snapshot.jpg")
            assert err.value.code == 404
    finally:
        srv.stop()
