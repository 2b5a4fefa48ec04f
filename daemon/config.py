"""Configuration: a tree of pydantic models, one per section, loaded from TOML + environment.

The file is TOML; any key can be overridden from the environment as
``REGIONWATCH_<SECTION>__<KEY>`` (e.g. ``REGIONWATCH_DETECTOR__CONFIDENCE=0.5``). Unknown keys
are rejected everywhere, numbers are bounds-checked and region polygons are validated.

Example:
    >>> import tempfile
    >>> from daemon.config import Settings
    >>> model = tempfile.NamedTemporaryFile(suffix=".onnx")
    >>> s = Settings.from_toml_text(f'''
    ... [detector]
    ... model = "{model.name}"
    ... [[cameras]]
    ... id = "hall"
    ... url = "rtsp://user:secret@192.0.2.10/stream1"
    ... [[cameras.regions]]
    ... id = "table"
    ... polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]
    ... ''')
    >>> s.cameras[0].regions[0].anchor
    'bottom_center'
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from daemon.fleet import Shard
from daemon.geometry import first_edge_crossing
from daemon.redact import redact_url

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
]
"""Camera and region ids: safe in MQTT topics, metric labels and file names."""

PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]

DisplayName = Annotated[str, Field(max_length=64, pattern=r"^[^\x00-\x1f]*$")]
"""Optional human-readable name (Home Assistant shows it); empty: the id is used."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are re-validated on assignment, and
    every number must be finite (``inf`` and ``nan`` pass ``ge=0`` checks but break arithmetic)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DetectorConfig(Section):
    """[detector]: the YOLO person detector, run every ``interval_s`` of stream time to find new
    people, every ``tracking_interval_s`` while anyone is tracked (see :mod:`daemon.pipeline`)."""

    model: str = Field(min_length=1)
    interval_s: float = Field(0.5, ge=0, le=3600)
    tracking_interval_s: float = Field(0.3, ge=0, le=3600)
    # While nobody is tracked, skip the detector on frames without motion (frame differencing),
    # but run it at least every idle_check_s (someone who stood still since before the start).
    motion_gate: bool = True
    idle_check_s: float = Field(10.0, gt=0, le=3600)
    confidence: float = Field(0.35, gt=0, lt=1)
    iou: float = Field(0.7, gt=0, le=1)
    imgsz: int = Field(640, ge=32, le=4096)
    device: str = "cpu"
    min_box_area_px: float = Field(0, ge=0)
    runtime: Literal["auto", "ultralytics"] = "auto"
    threads: int = Field(1, ge=1, le=256)
    max_batch: int = Field(1, ge=1, le=64)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str) -> str:
        # Only local files or folders: a bare name such as "yolo11n.pt" would make ultralytics
        # download it at run time, and the daemon promises never to download anything.
        if not Path(v).exists():
            raise ValueError(
                f"model file not found: {v} (give the path of a local model file or folder; the daemon never "
                "downloads models. On a connected machine: pip install ultralytics; yolo export "
                "model=yolo11n.pt format=onnx, then copy yolo11n.onnx here; see README, Models and weights)"
            )
        return v


class ByteTrackConfig(Section):
    """[tracker.bytetrack]: ultralytics' ByteTrack thresholds."""

    track_high_thresh: float = Field(0.25, gt=0, lt=1)
    track_low_thresh: float = Field(0.1, ge=0, lt=1)
    new_track_thresh: float = Field(0.25, gt=0, lt=1)
    match_thresh: float = Field(0.8, gt=0, le=1)
    fuse_score: bool = True


class Sam2Config(Section):
    """[tracker.sam2]: the streaming SAM2 tracker."""

    model_config_name: str = Field("configs/sam2.1/sam2.1_hiera_t.yaml", alias="model_config")
    checkpoint: str = ""
    device: str = "cuda"
    image_size: int = Field(1024, ge=64, le=4096)
    max_people: int = Field(16, ge=1, le=256)
    max_people_total: int = Field(64, ge=1, le=4096)
    track_fps: float = Field(10.0, gt=0, le=240)
    match_iou: float = Field(0.3, gt=0, le=1)
    prompt: Literal["box", "points"] = "box"
    max_cond_frames: int = Field(2, ge=1, le=64)
    max_cond_age_s: float = Field(10.0, gt=0, le=86400)
    reanchor_iou: float = Field(0.5, ge=0, le=1)
    confirm_steps: int = Field(2, ge=0, le=100)
    duplicate_iou: float = Field(0.8, gt=0, le=1)
    reset_gap_s: float = Field(1.0, gt=0, le=86400)
    encoder_batches: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32], min_length=1)
    max_batch: int = Field(64, ge=1, le=4096)
    bf16: bool = True
    tf32: bool = True
    compile: bool = False
    mask_polygon: bool = False
    random_weights_for_tests: bool = False

    model_config = ConfigDict(populate_by_name=True)  # merged with Section's settings

    @field_validator("encoder_batches")
    @classmethod
    def _batches_increase(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 256 for b in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError(f"must be increasing batch sizes between 1 and 256, got {v}")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError(f"SAM2 checkpoint not found: {v} (download it on a connected machine, see README)")
        return v


class TrackerConfig(Section):
    """[tracker]: which tracker follows people between detections."""

    backend: Literal["bytetrack", "sam2"] = "bytetrack"
    lost_after_s: PositiveSeconds = 2.0
    bytetrack: ByteTrackConfig = ByteTrackConfig()
    sam2: Sam2Config = Sam2Config()


class EventsConfig(Section):
    """[events]: region logic tuning shared by all regions."""

    debounce_s: float = Field(0.4, ge=0, le=60)


class RefineConfig(Section):
    """[refine]: look back through the frame buffer for the true entry frame."""

    enabled: bool = False
    budget_s: float = Field(1.5, gt=0, le=60)


MAX_POLYGON_POINTS = 1000
"""Region outlines are drawn by hand or traced by a tool; more points than this is a mistake
(and every point costs time in region logic on every frame)."""


def validate_polygon(points: list[list[float]]) -> list[tuple[float, float]]:
    """Check a polygon: 3 to :data:`MAX_POLYGON_POINTS` points of 2 finite numbers, simple (no
    self-intersection, checked vectorised), area > 0.

    Example:
        >>> validate_polygon([[0, 0], [10, 0], [10, 10]])
        [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)]
    """
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    if len(points) > MAX_POLYGON_POINTS:
        raise ValueError(f"a polygon may have at most {MAX_POLYGON_POINTS} points, got {len(points)}")
    pts: list[tuple[float, float]] = []
    for i, p in enumerate(points):
        if len(p) != 2:
            raise ValueError(f"point {i} must be [x, y], got {len(p)} numbers")
        x, y = float(p[0]), float(p[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"point {i} is not finite: [{p[0]}, {p[1]}]")
        pts.append((x, y))
    if len(set(pts)) != len(pts):
        raise ValueError("polygon repeats a point")
    n = len(pts)
    crossing = first_edge_crossing(pts)
    if crossing is not None:
        raise ValueError(f"polygon edges {crossing[0]} and {crossing[1]} intersect (self-intersecting polygon)")
    area2 = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))
    if area2 == 0:
        raise ValueError("polygon has zero area")
    return pts


class RegionConfig(Section):
    """[[cameras.regions]]: a polygon in the camera's pixel coordinates."""

    id: Identifier
    name: DisplayName = ""
    polygon: list[list[Annotated[float, Field(allow_inf_nan=True)]]]  # validate_polygon names the bad point
    anchor: Literal["bottom_center", "center", "bbox_overlap", "mask_overlap"] = "bottom_center"
    min_overlap: float = Field(0.5, gt=0, le=1)

    @field_validator("polygon")
    @classmethod
    def _polygon(cls, v: list[list[float]]) -> list[list[float]]:
        return [list(p) for p in validate_polygon(v)]

    @property
    def display_name(self) -> str:
        return self.name or self.id


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):(//)?")  # a URL's scheme, and whether "//" follows
CAMERA_URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt", "udp", "rtp", "tcp")
"""Network schemes a camera URL may use (FFmpeg protocols for live video); anything else is a typo."""


class CameraConfig(Section):
    """[[cameras]]: one video source (file path or rtsp:// URL) and its regions."""

    id: Identifier
    name: DisplayName = ""
    url: str = Field(min_length=1)
    enabled: bool = True
    realtime: bool = False
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: PositiveSeconds = 10.0
    read_timeout_s: PositiveSeconds = 10.0
    reconnect_base_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 30.0
    stall_timeout_s: PositiveSeconds = 15.0
    buffer_s: float = Field(10.0, ge=0, le=600)
    buffer_mb: float = Field(128.0, gt=0, le=65536)
    jpeg_quality: int = Field(85, ge=10, le=100)
    queue_frames: int = Field(8, ge=1, le=1024)
    decode_threads: int = Field(1, ge=0, le=64)
    regions: list[RegionConfig] = []

    @property
    def is_live(self) -> bool:
        """True for network streams (reconnect forever), False for files (process once)."""
        return "://" in self.url and not self.url.startswith("file://")

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @field_validator("url")
    @classmethod
    def _known_scheme_or_file(cls, v: str) -> str:
        scheme = _SCHEME.match(v)
        if scheme and scheme[1].lower() != "file" and not Path(v).exists():
            # Never echo the URL here: it may carry a password that redaction would not spot.
            name = scheme[1].lower()
            if not scheme[2]:
                raise ValueError(f"malformed URL: '{name}:' must be followed by '//' (as in rtsp://host/path)")
            if name not in CAMERA_URL_SCHEMES:
                raise ValueError(f"unknown URL scheme '{name}' (known: {', '.join(CAMERA_URL_SCHEMES)}, file)")
            return v
        if not Path(v.removeprefix("file://")).is_file():
            raise ValueError(f"video file not found: {v}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> CameraConfig:
        ids = [r.id for r in self.regions]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate region id(s): {', '.join(dup)}")
        if self.reconnect_max_s < self.reconnect_base_s:
            raise ValueError("reconnect_max_s must be >= reconnect_base_s")
        return self


class JsonlSinkConfig(Section):
    """[sinks.jsonl]: append one JSON event per line; empty path disables it."""

    path: str = ""
    snapshots: bool = False


class StdoutSinkConfig(Section):
    """[sinks.stdout]: print each event as one JSON line on standard output."""

    enabled: bool = True


class MqttTlsConfig(Section):
    """[sinks.mqtt.tls]"""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


class MqttSinkConfig(Section):
    """[sinks.mqtt]: durable MQTT delivery."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = "regionwatch"
    topic_prefix: str = "regionwatch"
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(30, ge=5, le=3600)
    qos: Literal[0, 1, 2] = 1
    username: str = ""
    password_env: str = "REGIONWATCH_MQTT_PASSWORD"
    password_file: str = ""
    tls: MqttTlsConfig = MqttTlsConfig()
    snapshots: bool = True
    homeassistant_discovery: bool = False
    discovery_prefix: str = "homeassistant"
    reconnect_min_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 30.0
    stats_interval_s: float = Field(60.0, ge=0, le=86400)  # 0: no stats messages

    @field_validator("topic_prefix", "discovery_prefix")
    @classmethod
    def _plain_topic_prefix(cls, v: str) -> str:
        # A prefix becomes the first levels of published topics: wildcards are not allowed in a
        # topic name (the broker would refuse every publish) and "$" topics belong to the broker.
        if not v.strip("/"):
            raise ValueError("must name at least one topic level, e.g. 'regionwatch'")
        if "#" in v or "+" in v:
            raise ValueError(f"{v!r} contains an MQTT wildcard ('#' or '+'), which topic names must not")
        if v.startswith("$"):
            raise ValueError(f"{v!r} starts with '$': such topics are reserved for the broker ($SYS)")
        if re.search(r"[\s\x00]", v):
            raise ValueError(f"{v!r} contains whitespace or a NUL character")
        return v


class SinksConfig(Section):
    """[sinks]"""

    jsonl: JsonlSinkConfig = JsonlSinkConfig()
    stdout: StdoutSinkConfig = StdoutSinkConfig()
    mqtt: MqttSinkConfig = MqttSinkConfig()


class StateConfig(Section):
    """[state]: where durable state (event sequence numbers, MQTT outbox, snapshots) lives."""

    dir: str = Field(default_factory=lambda: os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "state")
    outbox_max_events: int = Field(100_000, ge=10)
    outbox_max_age_s: float = Field(7 * 86400, gt=0)
    fsync: Literal["full", "normal", "off"] = "normal"


class MetricsConfig(Section):
    """[metrics]: Prometheus metrics, /healthz, /readyz (and the preview) on one HTTP listener."""

    enabled: bool = True
    listen: str = Field("127.0.0.1:9108", pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):\d{1,5}$")
    linger_s: float = Field(0.0, ge=0, le=3600)  # file-only runs: keep serving this long after the end
    # How others reach the listener (snapshot links in events, Home Assistant's device page);
    # empty: http://<listen address> (a wildcard address becomes this machine's host name).
    public_url: str = Field("", pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")

    # Host header names accepted besides localhost, IP addresses and the listen host ("*": any).
    allowed_hosts: list[Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9_]([A-Za-z0-9_.\-]*[A-Za-z0-9_])?)$")]] = []

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        from daemon.ops.httpd import parse_listen

        parse_listen(v)  # port range, bracketed IPv6
        return v


class SnapshotsConfig(Section):
    """[snapshots]: entry snapshots kept on disk and served by event id on the HTTP listener."""

    keep: bool = True
    keep_days: float = Field(7.0, gt=0, le=3650)
    keep_mb: float = Field(512.0, gt=0, le=1048576)


class PreviewConfig(Section):
    """[preview]: annotated live preview over HTTP on the metrics listener (off by default)."""

    enabled: bool = False
    max_fps: float = Field(5.0, gt=0, le=60)
    jpeg_quality: int = Field(75, ge=10, le=100)


class FleetConfig(Section):
    """[fleet]: run only this replica's share of the cameras (see daemon/fleet.py)."""

    shard: str = ""  # "I/N" or "POD-NAME-I/N"; empty: run every camera

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str) -> str:
        return str(Shard.parse(v)) if v.strip() else ""

    @property
    def parsed(self) -> Shard | None:
        return Shard.parse(self.shard) if self.shard else None


class LoggingConfig(Section):
    """[logging]"""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """The whole configuration file."""

    model_config = SettingsConfigDict(
        env_prefix="REGIONWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    detector: DetectorConfig
    tracker: TrackerConfig = TrackerConfig()
    events: EventsConfig = EventsConfig()
    refine: RefineConfig = RefineConfig()
    sinks: SinksConfig = SinksConfig()
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()
    preview: PreviewConfig = PreviewConfig()
    snapshots: SnapshotsConfig = SnapshotsConfig()
    logging: LoggingConfig = LoggingConfig()
    fleet: FleetConfig = FleetConfig()
    cameras: list[CameraConfig] = Field(min_length=1)

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cams: list[CameraConfig]) -> list[CameraConfig]:
        ids = [c.id for c in cams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate camera id(s): {', '.join(dup)}")
        return cams

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if not any(c.enabled for c in self.cameras):
            raise ValueError("cameras: every camera is disabled; enable at least one (enabled = true)")
        if self.tracker.backend == "sam2" and not (
            self.tracker.sam2.checkpoint or self.tracker.sam2.random_weights_for_tests
        ):
            raise ValueError("tracker.sam2.checkpoint: required when tracker.backend = 'sam2'")
        for cam in self.cameras:
            for r in cam.regions:
                if r.anchor == "mask_overlap" and self.tracker.backend != "sam2":
                    raise ValueError(
                        f"cameras.{cam.id}.regions.{r.id}: anchor 'mask_overlap' needs tracker.backend = 'sam2'"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the file; the file's contents arrive as init kwargs.
        return env_settings, init_settings

    @classmethod
    def from_toml_text(cls, text: str, *, base_dir: Path | None = None) -> Settings:
        """Parse and validate TOML text; relative paths resolve against ``base_dir``."""
        data = tomllib.loads(text)
        return cls(**_resolve_paths(data, base_dir)) if base_dir else cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Settings:
        """Load a TOML file; relative file paths inside it are taken relative to the file."""
        p = Path(path)
        return cls.from_toml_text(p.read_text(encoding="utf-8"), base_dir=p.resolve().parent)


_PATH_KEYS = {
    ("detector", "model"),
    ("tracker", "sam2", "checkpoint"),
    ("sinks", "jsonl", "path"),
    ("sinks", "mqtt", "password_file"),
    ("sinks", "mqtt", "tls", "ca_file"),
    ("sinks", "mqtt", "tls", "cert_file"),
    ("sinks", "mqtt", "tls", "key_file"),
    ("state", "dir"),
}


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative file paths in the config relative to the config file's folder."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value:
            return value
        if _SCHEME.match(value) and not (base / value).exists():
            return value  # a mistyped URL ("rtsp:/cam"): left for the URL check, which names the problem
        return str(base / value)

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, path) for v in node]
        if path in _PATH_KEYS or path == ("cameras", "url"):
            return fix(node)
        return node

    return walk(data, ())


class ConfigError(Exception):
    """Configuration problems, each rendered as ``section.key: what is wrong``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def format_validation_error(err: ValidationError) -> list[str]:
    """Turn a pydantic error into ``section.key: message`` lines (secrets redacted)."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and re.match(r"^[\w.\-]+: ", msg):  # a cross-field check that names its key
            out.append(redact_url(msg))
            continue
        loc = loc or "config"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{loc}: {redact_url(msg)}")
    return out


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Load and validate a config file, raising :class:`ConfigError` with readable problems."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"config: cannot read {p}: {e.strerror or e}"]) from None
    try:
        return Settings.from_toml_text(text, base_dir=p.resolve().parent)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"config: {p} is not valid TOML: {e}"]) from None
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except SettingsError as e:  # e.g. malformed JSON in a REGIONWATCH_<SECTION> environment override
        raise ConfigError([f"environment: {redact_url(str(e))}"]) from None
