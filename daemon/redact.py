"""Keep secrets out of logs, errors, metric labels and events.

User info is cut the way FFmpeg splits a URL (``av_url_split``): the authority runs from
``://`` to the first ``/``, ``?`` or ``#``, and the user info is everything in it up to the
*last* ``@``. So ``rtsp://admin:p@ss@cam/x`` (a working camera URL: FFmpeg logs in as ``admin``
with password ``p@ss``) loses the whole ``admin:p@ss``, not just ``admin:p``. Percent-encoded
passwords (``p%40ss``) are cut with the rest of the user info, and so are query values whose key
looks like a secret (``password``, ``token``, ``access_token``, ``apiKey``, ``X-Amz-Signature``…).

Example:
    >>> redact_url("rtsp://admin:hunter2@10.0.0.5:554/stream1")
    'rtsp://***:***@10.0.0.5:554/stream1'
    >>> redact_url("failed to open rtsp://admin:p@ss-s3cret@cam/x: timeout")
    'failed to open rtsp://***:***@cam/x: timeout'
    >>> redact_url("http://cam/snap.jpg?user=me&access_token=abc123&w=640")
    'http://cam/snap.jpg?user=me&access_token=***&w=640'
"""

from __future__ import annotations

import logging
import re

# The authority may hold spaces (FFmpeg does not stop at them) but never a line break; the
# greedy run backtracks to its last "@", exactly like av_url_split's loop over '@'.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\r\n]*)@")
_SECRET_WORDS = r"pass|pwd|token|auth|key|secret|sig|cred|session"
_QUERY_SECRET = re.compile(rf"(?i)([?&;][^=&#\s]*(?:{_SECRET_WORDS})[^=&#\s]*=)[^&#\s]*")


def redact_url(text: str) -> str:
    """Replace the user info of every URL inside ``text``, and secret-looking query values."""
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
