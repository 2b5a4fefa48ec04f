"""Offline jobs on one file camera (``annotate``, ``evaluate``): their settings and the video's facts.

Example:
    >>> from daemon.config import Settings
    >>> s = Settings.from_toml_text('''
    ... [detector]
    ... model = "../shared/assets/models/yolov8n_int8.onnx"
    ... [[cameras]]
    ... id = "door"
    ... url = "rtsp://cam/1"
    ... [[cameras]]
    ... id = "hall"
    ... url = "../shared/assets/footage/one-by-one-person-detection.mp4"
    ... ''')
    >>> job = file_camera_settings(s, "hall", "/tmp/state", job="evaluate")
    >>> [c.id for c in job.cameras], job.sinks.stdout.enabled, job.metrics.enabled
    (['hall'], False, False)
    >>> file_camera_settings(s, "door", "/tmp/state", job="evaluate")
    Traceback (most recent call last):
    ...
    daemon.jobs.JobError: camera door is a live stream (rtsp://cam/1); evaluate needs a file
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av

from daemon.config import (
    FleetConfig,
    JsonlSinkConfig,
    MetricsConfig,
    MqttSinkConfig,
    PreviewConfig,
    Settings,
    SinksConfig,
    StateConfig,
    StdoutSinkConfig,
)


class JobError(Exception):
    """A problem that stops the job before it starts; ``code`` is the process exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a video file says about its first video stream."""

    width: int
    height: int
    rate: Fraction
    frames: int  # 0 when the container does not say

    @classmethod
    def probe(cls, path: str | os.PathLike[str]) -> VideoInfo:
        """Read size, frame rate and frame count from the file's header.

        Example:
            >>> VideoInfo.probe("../shared/assets/footage/one-by-one-person-detection.mp4")
            VideoInfo(width=768, height=432, rate=Fraction(10, 1), frames=1394)
        """
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate or Fraction(25)
            frames = int(s.frames or 0)
            if not frames and s.duration and s.time_base:
                frames = round(float(s.duration * s.time_base * rate))
            return cls(int(s.codec_context.width), int(s.codec_context.height), Fraction(rate), frames)


def file_camera_settings(settings: Settings, camera_id: str | None, state_dir: str, *, job: str) -> Settings:
    """The settings of an offline ``job`` run: one file camera, processed losslessly, publishing nothing."""
    cams = settings.cameras
    if camera_id is None:
        if len(cams) != 1:
            raise JobError(f"the config has {len(cams)} cameras; pick one with --camera "
                                f"({', '.join(c.id for c in cams)})", 2)
        camera_id = cams[0].id
    cam = next((c for c in cams if c.id == camera_id), None)
    if cam is None:
        raise JobError(f"no camera {camera_id!r} in the config (cameras: {', '.join(c.id for c in cams)})", 2)
    if cam.is_live:
        raise JobError(f"camera {cam.id} is a live stream ({cam.safe_url}); {job} needs a file", 2)
    return settings.model_copy(update={
        "cameras": [cam.model_copy(update={"enabled": True, "realtime": False})],
        "sinks": SinksConfig(jsonl=JsonlSinkConfig(), stdout=StdoutSinkConfig(enabled=False),
                             mqtt=MqttSinkConfig(enabled=False)),
        "state": StateConfig(dir=state_dir),
        "metrics": MetricsConfig(enabled=False),
        "preview": PreviewConfig(enabled=False),
        "fleet": FleetConfig(),  # any camera of the config, whichever replica runs it
    })
