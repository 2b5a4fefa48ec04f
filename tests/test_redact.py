"""Secrets never reach logs: URLs in messages and in (chained) tracebacks are redacted.

The URL properties run over generated camera URLs (hypothesis): passwords with ``@``, ``:``,
spaces, unicode and percent-encoding, IPv4/IPv6/name hosts, ports, paths and queries.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import string
import urllib.parse

import av
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@contextlib.contextmanager
def redacting_log(name: str):
    """A logger whose output (through RedactingFilter) lands in the yielded StringIO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)


def test_chained_pyav_error_in_a_traceback_is_redacted():
    with redacting_log("redact-test") as (log, stream):
        try:
            try:
                # A real PyAV error: its text carries the URL (nothing listens on port 9 of loopback).
                av.open("rtsp://admin:hunter2@127.0.0.1:9/stream", options={"rtsp_transport": "tcp"}, timeout=2)
            except (av.FFmpegError, OSError) as e:
                raise RuntimeError("camera door failed") from e
        except RuntimeError:
            log.exception("while opening %s", "rtsp://admin:hunter2@127.0.0.1:9/stream")
    out = stream.getvalue()
    assert "hunter2" not in out
    assert "rtsp://***:***@127.0.0.1:9/stream" in out
    assert "camera door failed" in out and "Traceback" in out


# -- property-based: generated camera URLs --------------------------------------------------------
# What FFmpeg takes raw in a password (av_url_split stops the authority at "/", "?" and "#"; "@"
# and ":" are fine because the user info ends at the LAST "@"); anything else is percent-encoded,
# as users must do for "/", "?", "#" and "%".
RAW_OK = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@ "
SCHEMES = ["rtsp", "rtsps", "http", "https", "rtmp", "srt"]
hosts = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9-]{0,15}(\.[a-z]{2,6}){0,2}\Z"),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
paths = st.from_regex(r"\A(/[A-Za-z0-9_.-]{0,12}){0,3}(\?[a-z]{1,5}=[a-z0-9]{0,5})?\Z")
users = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)
passwords = st.one_of(
    st.text(alphabet=RAW_OK, min_size=1, max_size=24),  # written as is: "@", ":" and spaces included
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), min_size=1, max_size=24),
)


def encode_password(password: str, raw: bool) -> str:
    """The password as a user writes it into the URL: raw where FFmpeg allows, else percent-encoded."""
    if raw and all(c in RAW_OK for c in password):
        return password
    return urllib.parse.quote(password, safe="")


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), user=users, password=passwords, raw=st.booleans(), host=hosts,
       port=ports, path=paths)
def test_generated_urls_lose_exactly_their_user_info(scheme, user, password, raw, host, port, path):
    written = encode_password(password, raw)
    url = f"{scheme}://{user}:{written}@{host}{port}{path}"
    # FFmpeg's split (av_url_split): the authority ends at the first "/", "?" or "#", user info at its last "@".
    authority = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
    assert authority.rpartition("@")[0] == f"{user}:{written}", "generator made a URL FFmpeg reads differently"
    assert redact_url(url) == f"{scheme}://***:***@{host}{port}{path}"


@settings(max_examples=300, deadline=None)
@given(user=users, password=passwords.filter(lambda p: len(p.strip()) >= 6), raw=st.booleans(), host=hosts,
       before=st.text(alphabet=string.ascii_letters + " :'\"(", max_size=20),
       after=st.text(alphabet=string.ascii_letters + " :'\")", max_size=20))
def test_no_password_substring_survives_in_a_log_line(user, password, raw, host, before, after):
    written = encode_password(password, raw)
    line = f"{before} rtsp://{user}:{written}@{host}/stream1 {after}".strip()
    out = redact_url(line)
    for secret in {password, written, urllib.parse.quote(password, safe="")}:
        if secret not in before + " " + after:  # it was only ever inside the URL
            assert secret not in out, (line, out)
    assert f"@{host}/stream1" in out


@pytest.mark.parametrize("password", ["p@ss", "a:b", "p%40ss", "@@", "x:y@z", "p@ss-s3cret"])
def test_passwords_with_at_colon_and_percent_encoding(password):
    url = f"rtsp://admin:{password}@192.0.2.10:554/stream1"
    assert redact_url(f"opening {url} failed") == "opening rtsp://***:***@192.0.2.10:554/stream1 failed"


@pytest.mark.parametrize(
    "query, expected",
    [
        ("?token=abc", "?token=***"),
        ("?x=1&access_token=abc&y=2", "?x=1&access_token=***&y=2"),
        ("?apiKey=abc#frag", "?apiKey=***#frag"),
        ("?X-Amz-Signature=abc&X-Amz-Credential=me", "?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("?pwd=a%40b", "?pwd=***"),
        ("?channel=1&subtype=0", "?channel=1&subtype=0"),
    ],
)
def test_query_string_tokens(query, expected):
    assert redact_url(f"http://cam/video.cgi{query}") == f"http://cam/video.cgi{expected}"


def test_the_whole_user_info_goes_in_logs():
    """Probe 2 of issue 12: a password with '@' was logged as rtsp://***:***@ss-s3cret@host/x."""
    with redacting_log("redact-test-at") as (log, stream):
        log.warning("camera door: cannot open %s", "rtsp://admin:p@ss-s3cret@127.0.0.1:9/x")
    assert stream.getvalue().strip() == "camera door: cannot open rtsp://***:***@127.0.0.1:9/x"
