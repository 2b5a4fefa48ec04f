"""Keep secrets out of logs, errors, metric labels and events.

Example:
    >>> redact_url("rtsp://admin:hunter2@10.0.0.5:554/stream1")
    'rtsp://***:***@10.0.0.5:554/stream1'
    >>> redact_url("failed to open rtsp://user:pw@cam/x: timeout")
    'failed to open rtsp://***:***@cam/x: timeout'
"""

from __future__ import annotations

import logging
import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]*)@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|auth|key|secret)=)[^&\s]*")


def redact_url(text: str) -> str:
    """Replace user:password in every URL inside ``text`` and secret-looking query values."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***:***@" if m["userinfo"] else m[0], text)
    return _QUERY_SECRET.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials from every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_url(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = redact_url(str(exc))
            if text != str(exc):
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} ({type(exc).__name__}: {text})"
        return True
