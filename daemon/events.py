"""Versioned event records (``regionwatch.event/1``) and the factory that numbers them.

Region logic emits :class:`RegionTransition`; :class:`EventFactory` turns each into an
:class:`Event` with a uuid4 ``id``, a per-camera ``seq`` and an ISO-8601 UTC ``time``.
The JSON Schema is generated from :class:`Event` and committed as
``daemon/schema/event-1.schema.json`` (``python -m daemon.events`` rewrites it).

Example:
    >>> import tempfile
    >>> from daemon.state import SeqStore
    >>> f = EventFactory(SeqStore(tempfile.mkdtemp()))
    >>> t = RegionTransition("entry", "hall", "table", 3, 120, 12.0, 1.7e9,
    ...                      (1.0, 2.0, 3.0, 4.0), (2.0, 4.0), 0.9)
    >>> e = f.make(t)
    >>> e.seq, e.type, e.time
    (1, 'entry', '2023-11-14T22:13:20.000Z')
    >>> sorted(e.to_dict())[:4]
    ['anchor', 'bbox', 'camera', 'frame']
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from daemon.state import SeqStore

SCHEMA_ID = "regionwatch.event/1"
SCHEMA_PATH = Path(__file__).with_name("schema") / "event-1.schema.json"

EventType = Literal["entry", "exit"]
ExitReason = Literal["left_region", "track_lost"]


@dataclass(frozen=True, slots=True)
class RegionTransition:
    """What region logic decided: a person entered or left a region at a given frame."""

    type: EventType
    camera: str
    region: str
    track_id: int
    frame: int
    pts_s: float
    wall_time: float
    bbox: tuple[float, float, float, float]
    anchor: tuple[float, float]
    score: float
    dwell_s: float | None = None
    reason: ExitReason | None = None
    detected_frame: int | None = None
    refined: str | None = None
    mask_bbox: tuple[float, float, float, float] | None = None
    mask_polygon: list[list[float]] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One region event as published to every sink (fields set to None are omitted in JSON)."""

    id: str
    seq: int
    type: EventType
    camera: str
    region: str
    track_id: int
    frame: int
    pts_s: float
    time: str
    bbox: list[float]
    anchor: list[float]
    score: float
    dwell_s: float | None = None
    reason: ExitReason | None = None
    detected_frame: int | None = None
    refined: str | None = None
    mask_bbox: list[float] | None = None
    mask_polygon: list[list[float]] | None = None
    snapshot: str | None = None
    snapshot_url: str | None = None
    schema: str = field(default=SCHEMA_ID)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def iso_utc(ts: float) -> str:
    """UNIX seconds → ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventFactory:
    """Numbers transitions per camera and stamps them with an id and time."""

    def __init__(self, seq: SeqStore):
        self._seq = seq

    def make(self, t: RegionTransition) -> Event:
        r = lambda xs: [round(float(x), 2) for x in xs]  # noqa: E731
        return Event(
            id=str(uuid.uuid4()),
            seq=self._seq.next(t.camera),
            type=t.type,
            camera=t.camera,
            region=t.region,
            track_id=int(t.track_id),
            frame=int(t.frame),
            pts_s=round(float(t.pts_s), 4),
            time=iso_utc(t.wall_time),
            bbox=r(t.bbox),
            anchor=r(t.anchor),
            score=round(float(t.score), 4),
            dwell_s=None if t.dwell_s is None else round(float(t.dwell_s), 3),
            reason=t.reason,
            detected_frame=t.detected_frame,
            refined=t.refined,
            mask_bbox=None if t.mask_bbox is None else r(t.mask_bbox),
            mask_polygon=t.mask_polygon,
        )


def json_schema() -> dict:
    """The JSON Schema of :class:`Event` as serialised by :meth:`Event.to_dict`."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Event).json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "regionwatch event, version 1"
    props = schema["properties"]
    props["schema"] = {"const": SCHEMA_ID, "title": "Schema"}
    props["bbox"].update(minItems=4, maxItems=4)
    props["anchor"].update(minItems=2, maxItems=2)
    props["seq"]["minimum"] = 1
    props["id"]["format"] = "uuid"
    props["time"]["format"] = "date-time"
    props["snapshot_url"]["format"] = "uri"
    # Optional fields are omitted rather than null in the JSON we emit.
    for name, prop in props.items():
        if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            rest = [p for p in prop["anyOf"] if p != {"type": "null"}]
            prop.pop("anyOf")
            prop.pop("default", None)
            prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
    schema["required"] = sorted(set(schema.get("required", [])) | {"schema"})
    schema["additionalProperties"] = False
    return schema


if __name__ == "__main__":
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")
