"""Configuration: valid files, environment overrides, and many bad files with clear problems."""

from __future__ import annotations

import re

import math
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import MAX_POLYGON_POINTS, ConfigError, Settings, load_settings, validate_polygon
from daemon.geometry import first_edge_crossing

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, body: str, footage: Path, model: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(textwrap.dedent(body).replace("@FOOTAGE@", str(footage)).replace("@MODEL@", str(model)))
    return p


BASE = """
[detector]
model = "@MODEL@"
interval_s = 0.5
confidence = 0.35
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "events.jsonl"
[sinks.stdout]
enabled = true
[[cameras]]
id = "hall"
url = "@FOOTAGE@"
[[cameras.regions]]
id = "table"
polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]
anchor = "bottom_center"
"""


def problems(tmp_path, body, footage, yolo_model) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, body, footage, yolo_model))
    return e.value.problems


def test_issue_shape_is_accepted(tmp_path, footage, yolo_model):
    s = load_settings(write(tmp_path, BASE, footage, yolo_model))
    assert s.detector.interval_s == 0.5
    assert s.cameras[0].regions[0].polygon[2] == [470.0, 400.0]
    # relative paths are taken relative to the config file
    assert s.sinks.jsonl.path == str(tmp_path / "events.jsonl")
    assert not s.cameras[0].is_live


def test_env_overrides_file(tmp_path, footage, yolo_model, monkeypatch):
    monkeypatch.setenv("REGIONWATCH_DETECTOR__CONFIDENCE", "0.6")
    monkeypatch.setenv("REGIONWATCH_EVENTS__DEBOUNCE_S", "1.5")
    s = load_settings(write(tmp_path, BASE, footage, yolo_model))
    assert s.detector.confidence == 0.6
    assert s.events.debounce_s == 1.5


def test_env_override_is_validated(tmp_path, footage, yolo_model, monkeypatch):
    monkeypatch.setenv("REGIONWATCH_DETECTOR__CONFIDENCE", "7")
    assert problems(tmp_path, BASE, footage, yolo_model) == ["detector.confidence: Input should be less than 1"]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("confidence = 0.35", "confidence = 0.35\nconfdence = 1"), "detector.confdence: unknown key"),
        (("interval_s = 0.5", "interval_s = -1"), "detector.interval_s: Input should be greater than or equal to 0"),
        (("confidence = 0.35", "confidence = 1.5"), "detector.confidence: Input should be less than 1"),
        (('backend = "bytetrack"', 'backend = "kalman"'), "tracker.backend: Input should be 'bytetrack' or 'sam2'"),
        (('anchor = "bottom_center"', 'anchor = "head"'), "cameras.0.regions.0.anchor: Input should be"),
        (
            ("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", "polygon = [[0, 0], [10, 0]]"),
            "cameras.0.regions.0.polygon: a polygon needs at least 3 points, got 2",
        ),
        (
            ("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", "polygon = [[0, 0], [10, 10], [10, 0], [0, 10]]"),
            "cameras.0.regions.0.polygon: polygon edges 0 and 2 intersect",
        ),
        (
            ("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", "polygon = [[0, 0], [nan, 0], [5, 5]]"),
            "cameras.0.regions.0.polygon: point 1 is not finite",
        ),
        (
            ("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", "polygon = [[0, 0], [5, 5], [10, 10]]"),
            "cameras.0.regions.0.polygon: polygon has zero area",
        ),
        (
            ("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", "polygon = [[0, 0], [5], [10, 10]]"),
            "cameras.0.regions.0.polygon: point 1 must be [x, y]",
        ),
        (('id = "table"', 'id = "ta ble"'), "cameras.0.regions.0.id: String should match pattern"),
        (('url = "@FOOTAGE@"', 'url = "/nonexistent/clip.mp4"'), "cameras.0.url: video file not found: /nonexistent/clip.mp4"),
        (('model = "@MODEL@"', 'model = "/nonexistent/w.onnx"'), "detector.model: model file not found"),
        (("[sinks.stdout]", "[sinks.stdout]\ncolour = true"), "sinks.stdout.colour: unknown key"),
        (("[tracker]", "[trackr]"), "trackr: unknown key"),
    ],
)
def test_bad_configs_name_section_and_key(tmp_path, footage, yolo_model, edit, expected):
    old, new = edit
    assert old in BASE
    found = problems(tmp_path, BASE.replace(old, new, 1), footage, yolo_model)
    assert any(p.startswith(expected) for p in found), found


def test_missing_required_and_duplicates(tmp_path, footage, yolo_model):
    body = BASE.replace('model = "@MODEL@"\n', "") + BASE[BASE.index("[[cameras]]"):]
    found = problems(tmp_path, body, footage, yolo_model)
    assert "detector.model: required key is missing" in found
    assert "cameras: duplicate camera id(s): hall" in found


def test_sam2_needs_checkpoint(tmp_path, footage, yolo_model):
    found = problems(tmp_path, BASE.replace('"bytetrack"', '"sam2"'), footage, yolo_model)
    assert "tracker.sam2.checkpoint: required when tracker.backend = 'sam2'" in found
    body = BASE.replace('"bytetrack"', '"sam2"') + '[tracker.sam2]\ncheckpoint = "/nope/sam2.1_hiera_tiny.pt"\n'
    body = body.replace("[tracker.sam2]", "[tracker.sam2]", 1)
    found = problems(tmp_path, body.replace('[tracker]\nbackend = "sam2"\n', ""), footage, yolo_model)
    assert any("SAM2 checkpoint not found: /nope/sam2.1_hiera_tiny.pt" in p for p in found)


def test_not_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[detector\nmodel=")
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert e.value.problems[0].startswith("config: ") and "not valid TOML" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "missing.toml")
    assert "cannot read" in e.value.problems[0]


def test_secrets_are_redacted_in_problems(tmp_path, footage, yolo_model):
    body = BASE.replace('url = "@FOOTAGE@"', 'url = "rtsp://admin:hunter2@192.0.2.1/s"\nrtsp_transport = "sctp"')
    found = problems(tmp_path, body, footage, yolo_model)
    assert found and all("hunter2" not in p for p in found)


@pytest.mark.parametrize(
    "poly",
    [[[0, 0], [4, 0], [4, 4], [0, 4]], [[0, 0], [10, 0], [5, 3], [10, 10], [0, 10]], [[0, 0], [1e4, 0], [0, 1e4]]],
)
def test_valid_polygons(poly):
    assert len(validate_polygon(poly)) == len(poly)


@pytest.mark.parametrize(
    "poly",
    [
        [[0, 0], [4, 4], [4, 0], [0, 4]],  # bow tie
        [[0, 0], [10, 0], [10, 10], [5, 0], [0, 10]],  # vertex touching an edge
        [[0, 0], [4, 0], [4, 4], [0, 0]],  # repeated point
        [[0, 0], [float("inf"), 0], [4, 4]],
    ],
)
def test_invalid_polygons(poly):
    with pytest.raises(ValueError):
        validate_polygon(poly)


def leaf_keys(model) -> list[str]:
    """Every configuration key (its TOML name) of a settings model, nested sections included."""
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None and isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = ann
        out += leaf_keys(sub) if sub is not None else [field.alias or name]
    return out


def test_example_config_documents_every_key_and_is_valid(tmp_path, footage, yolo_model):
    text = (REPO / "config.example.toml").read_text()
    undocumented = [key for key in leaf_keys(Settings) if not re.search(rf"^#? ?{re.escape(key)} =", text, re.M)]
    assert not undocumented, f"keys missing from config.example.toml: {undocumented}"
    # Point the example's paths at real files, then it must validate.
    s = Settings.from_toml_text(
        text.replace("/etc/regionwatch/yolov8n.onnx", str(yolo_model)).replace(
            "/var/lib/regionwatch/sample.mp4", str(footage)
        ),
        base_dir=tmp_path,
    )
    assert s.cameras


def test_check_config_cli_exit_codes(tmp_path, footage, yolo_model, regionwatch_bin):
    good = write(tmp_path, BASE, footage, yolo_model)
    r = subprocess.run([regionwatch_bin, "check-config", good], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("confidence = 0.35", "confidence = 2\nfoo = 1"))
    r = subprocess.run([regionwatch_bin, "check-config", bad], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["detector.confidence: Input should be less than 1", "detector.foo: unknown key"]
    r = subprocess.run([regionwatch_bin, "run", "--config", bad], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_cross_field_problem_names_its_key(tmp_path, footage, yolo_model):
    body = BASE.replace('anchor = "bottom_center"', 'anchor = "mask_overlap"')
    assert problems(tmp_path, body, footage, yolo_model) == [
        "cameras.hall.regions.table: anchor 'mask_overlap' needs tracker.backend = 'sam2'"
    ]


def test_malformed_environment_override_is_a_config_error(tmp_path, footage, yolo_model, monkeypatch):
    monkeypatch.setenv("REGIONWATCH_DETECTOR", "{bad json")
    found = problems(tmp_path, BASE, footage, yolo_model)
    assert len(found) == 1 and found[0].startswith("environment: ") and "detector" in found[0]


# -- issue 12: configs that validated but could not work ------------------------------------------
@pytest.mark.parametrize(
    "edit, expected",
    [
        (('model = "@MODEL@"', 'model = "yolo11n.pt"'), "detector.model: model file not found: "),
        (("confidence = 0.35", "confidence = 0.35\nmin_box_area_px = inf"),
         "detector.min_box_area_px: Input should be a finite number"),
        (("confidence = 0.35", "confidence = nan"), "detector.confidence: Input should be a finite number"),
        (("[sinks.stdout]", "[state]\noutbox_max_age_s = inf\n[sinks.stdout]"),
         "state.outbox_max_age_s: Input should be a finite number"),
        (("[sinks.stdout]", '[sinks.mqtt]\ntopic_prefix = "home/#"\n[sinks.stdout]'),
         "sinks.mqtt.topic_prefix: 'home/#' contains an MQTT wildcard"),
        (("[sinks.stdout]", '[sinks.mqtt]\ntopic_prefix = "home/+/cams"\n[sinks.stdout]'),
         "sinks.mqtt.topic_prefix: 'home/+/cams' contains an MQTT wildcard"),
        (("[sinks.stdout]", '[sinks.mqtt]\ntopic_prefix = "$SYS/rw"\n[sinks.stdout]'),
         "sinks.mqtt.topic_prefix: '$SYS/rw' starts with '$'"),
        (("[sinks.stdout]", '[sinks.mqtt]\ndiscovery_prefix = "/"\n[sinks.stdout]'),
         "sinks.mqtt.discovery_prefix: must name at least one topic level"),
        (('url = "@FOOTAGE@"', 'url = "rstp://admin:s3cret@192.0.2.1/s"'),
         "cameras.0.url: unknown URL scheme 'rstp' (known: rtsp, rtsps"),
        (('url = "@FOOTAGE@"', 'url = "rtsp:/admin:s3cret@192.0.2.1/s"'),
         "cameras.0.url: malformed URL: 'rtsp:' must be followed by '//'"),
        (('url = "@FOOTAGE@"', 'url = "@FOOTAGE@"\nenabled = false'),
         "cameras: every camera is disabled; enable at least one"),
        (("[sinks.stdout]", '[metrics]\nlisten = "127.0.0.1:99999"\n[sinks.stdout]'),
         "metrics.listen: port out of range in '127.0.0.1:99999'"),
        (("[sinks.stdout]", '[metrics]\nallowed_hosts = ["box.lan:9108"]\n[sinks.stdout]'),
         "metrics.allowed_hosts.0: String should match pattern"),
    ],
)
def test_configs_that_cannot_work_are_refused(tmp_path, footage, yolo_model, edit, expected):
    old, new = edit
    assert old in BASE
    found = problems(tmp_path, BASE.replace(old, new, 1).replace("@FOOTAGE@", str(footage)), footage, yolo_model)
    assert any(p.startswith(expected) for p in found), found
    assert all("s3cret" not in p for p in found)


def test_bare_model_name_says_how_to_get_a_model(tmp_path, footage, yolo_model):
    found = problems(tmp_path, BASE.replace('model = "@MODEL@"', 'model = "yolo11n.pt"'), footage, yolo_model)
    assert len(found) == 1
    assert "never downloads" in found[0] and "yolo export model=yolo11n.pt format=onnx" in found[0]
    # A model folder (OpenVINO export) is fine, and a relative path is taken from the config's folder.
    folder = tmp_path / "models" / "yolo11n_openvino_model"
    folder.mkdir(parents=True)
    s = load_settings(write(tmp_path, BASE.replace("@MODEL@", "models/yolo11n_openvino_model"), footage, yolo_model))
    assert s.detector.model == str(folder)


def test_polygon_point_cap(tmp_path, footage, yolo_model):
    ring = [[500 + 400 * math.cos(2 * math.pi * k / 3000), 500 + 400 * math.sin(2 * math.pi * k / 3000)]
            for k in range(3000)]
    body = BASE.replace("polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]", f"polygon = {ring}")
    assert problems(tmp_path, body, footage, yolo_model) == [
        "cameras.0.regions.0.polygon: a polygon may have at most 1000 points, got 3000"
    ]


def _scalar_first_crossing(pts):
    """The reference: the scalar loop config.py used before it was vectorised."""

    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    def on_segment(a, b, c):
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    def cross(p1, p2, q1, q2):
        d1, d2, d3, d4 = orient(q1, q2, p1), orient(q1, q2, p2), orient(p1, p2, q1), orient(p1, p2, q2)
        if ((d1 > 0) != (d2 > 0)) and d1 != 0 and d2 != 0 and ((d3 > 0) != (d4 > 0)) and d3 != 0 and d4 != 0:
            return True
        return ((d1 == 0 and on_segment(q1, q2, p1)) or (d2 == 0 and on_segment(q1, q2, p2))
                or (d3 == 0 and on_segment(p1, p2, q1)) or (d4 == 0 and on_segment(p1, p2, q2)))

    n = len(pts)
    for i in range(n):
        for j in range(i + 2, n):
            if not (i == 0 and j == n - 1) and cross(pts[i], pts[(i + 1) % n], pts[j], pts[(j + 1) % n]):
                return (i, j)
    return None


# Small integer grids make collinear overlaps, touching vertices and crossings common.
@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=3, max_size=12, unique=True),
       st.integers(1, 5))
def test_vectorised_crossing_check_matches_the_scalar_reference(points, block):
    pts = [(float(x), float(y)) for x, y in points]
    assert first_edge_crossing(pts, block=block) == _scalar_first_crossing(pts)


def test_big_polygons_validate(tmp_path):
    n = MAX_POLYGON_POINTS
    star = [[500 + (400 if k % 2 else 200) * math.cos(2 * math.pi * k / n),
             500 + (400 if k % 2 else 200) * math.sin(2 * math.pi * k / n)] for k in range(n)]
    assert len(validate_polygon(star)) == n
    crossed = [list(p) for p in star]
    crossed[n // 2] = [1500.0, 500.0]  # the leftmost point pulled far to the right, across the ring
    with pytest.raises(ValueError, match=r"polygon edges \d+ and \d+ intersect"):
        validate_polygon(crossed)
