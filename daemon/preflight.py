"""I/O preconditions of ``regionwatch run``, checked before any model loads.

A configuration can be valid and still unusable on this machine: a state folder that is a file
or read-only, a JSONL path that is a folder, a listen port that is taken. These are found here,
in seconds, and reported like configuration problems (``section.key: problem``, exit 2) instead
of as tracebacks after a minute of model loading. :func:`preflight` also opens the state folder
(lock and integrity checks, see :mod:`daemon.statedir`) and returns it.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> os.mkdir(os.path.join(d, "events.jsonl"))
    >>> jsonl_problems(os.path.join(d, "events.jsonl"))  # doctest: +ELLIPSIS
    ['sinks.jsonl.path: .../events.jsonl is a folder, not a file']
    >>> listen_problems("127.0.0.1:0")
    []
"""

from __future__ import annotations

import socket
from pathlib import Path

from daemon.config import ConfigError, Settings
from daemon.ops.httpd import bind_socket, parse_listen
from daemon.statedir import StateDir, StateDirError


class PreflightError(ConfigError):
    """The configuration cannot work on this machine; ``problems`` are ``section.key: problem`` lines."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def jsonl_problems(path: str) -> list[str]:
    """The JSONL file can be created (or appended to)."""
    if not path:
        return []
    p = Path(path)
    if p.is_dir():
        return [f"sinks.jsonl.path: {p} is a folder, not a file"]
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"sinks.jsonl.path: cannot create the folder {p.parent}: {_why(e)}"]
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        return [f"sinks.jsonl.path: cannot append to {p}: {_why(e)}"]
    return []


def listen_problems(listen: str) -> list[str]:
    """The listen address resolves and its port can be bound now."""
    try:
        host, port = parse_listen(listen)
        bind_socket(host, port).close()
    except ValueError as e:
        return [f"metrics.listen: {e}"]
    except socket.gaierror as e:
        return [f"metrics.listen: cannot resolve {listen}: {e.strerror or e}"]
    except OSError as e:
        return [f"metrics.listen: cannot listen on {listen}: {_why(e)}"]
    return []


def mqtt_problems(settings: Settings) -> list[str]:
    """The broker password and the TLS files can be read (when the MQTT sink is on)."""
    cfg = settings.sinks.mqtt
    if not cfg.enabled:
        return []
    from daemon.sinks.mqtt.credentials import MqttConfigError, read_password, tls_context

    try:
        read_password(cfg)
        if cfg.tls.enabled:
            tls_context(cfg.tls)
    except MqttConfigError as e:  # names its key already
        return [str(e) if str(e).startswith("sinks.mqtt") else f"sinks.mqtt: {e}"]
    except (OSError, ValueError) as e:
        return [f"sinks.mqtt.tls: {e}"]
    return []


def sink_problems(settings: Settings, sinks) -> list[str]:
    """I/O preconditions of the named sinks (``"jsonl"``, ``"mqtt"``), before a reload builds them."""
    problems: list[str] = []
    if "jsonl" in sinks:
        problems += jsonl_problems(settings.sinks.jsonl.path)
    if "mqtt" in sinks:
        problems += mqtt_problems(settings)
    return problems


def preflight(settings: Settings, metrics=None) -> StateDir:
    """Check every I/O precondition; return the opened (locked, checked) state folder.

    Raises :class:`PreflightError` with one line per problem.
    """
    problems: list[str] = []
    state = None
    try:
        state = StateDir.open(settings.state.dir, metrics=metrics)
    except StateDirError as e:
        problems.append(f"state.dir: {e}")
    if settings.sinks.jsonl.path:
        problems += jsonl_problems(settings.sinks.jsonl.path)
    if settings.metrics.enabled:
        problems += listen_problems(settings.metrics.listen)
    if problems:
        if state is not None:
            state.close()
        raise PreflightError(problems)
    assert state is not None
    return state

