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
    """A logging filter that redacts URL credentials from every record's message and traceback.

    The whole traceback is formatted and redacted here (chained exceptions included: PyAV
    errors carry the full stream URL in their text), then kept as ``record.exc_text``.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_url(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info:
            record.exc_text = redact_url(self._formatter.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_url(record.exc_text)
        return True
