"""Secrets never reach logs: URLs in messages and in (chained) tracebacks are redacted."""

from __future__ import annotations

import io
import logging

import av
import pytest

from daemon.redact import RedactingFilter, redact_url


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/s", "rtsp://***:***@10.0.0.5:554/s"),
        ("rtsp://user@cam/s", "rtsp://***:***@cam/s"),
        ("rtsp://cam/s", "rtsp://cam/s"),
        ("open 'rtsp://a:b@x/1' and http://c:d@y/2", "open 'rtsp://***:***@x/1' and http://***:***@y/2"),
        ("http://cam/snap?user=me&password=pw&x=1", "http://cam/snap?user=me&password=***&x=1"),
    ],
)
def test_redact_url(text, expected):
    assert redact_url(text) == expected


def test_chained_pyav_error_in_a_traceback_is_redacted():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("redact-test")
    log.addHandler(handler)
    try:
        try:
            # A real PyAV error: its text carries the URL (nothing listens on port 9 of loopback).
            av.open("rtsp://admin:hunter2@127.0.0.1:9/stream", options={"rtsp_transport": "tcp"}, timeout=2)
        except (av.FFmpegError, OSError) as e:
            raise RuntimeError("camera door failed") from e
    except RuntimeError:
        log.exception("while opening %s", "rtsp://admin:hunter2@127.0.0.1:9/stream")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2" not in out
    assert "rtsp://***:***@127.0.0.1:9/stream" in out
    assert "camera door failed" in out and "Traceback" in out
