"""Broker credentials and TLS for the MQTT sink: the password's source, the TLS context.

The password is never written in the config: it comes from ``password_file`` (also looked up in
systemd's ``$CREDENTIALS_DIRECTORY``) or from the environment variable ``password_env``. It never
appears in errors or logs; :func:`password_source` names where it came from instead.

Example:
    >>> from daemon.config import MqttSinkConfig
    >>> cfg = MqttSinkConfig(password_env="PW")
    >>> read_password(cfg, {"PW": "s3cret"}), password_source(cfg)
    ('s3cret', '$PW')
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from daemon.config import MqttSinkConfig, MqttTlsConfig

log = logging.getLogger(__package__)

AUTH_REFUSALS = frozenset({"Bad user name or password", "Not authorized", "Bad username or password"})
"""v5 reason codes / v3.1.1 CONNACK codes meaning "your credentials are wrong"."""


class MqttConfigError(RuntimeError):
    """A problem with ``[sinks.mqtt]`` found when the sink starts (e.g. unreadable password)."""


def read_password(cfg: MqttSinkConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The broker password: from ``password_file`` if set, else from the env var ``password_env``.

    Under systemd (``LoadCredential=mqtt-password:...``) the file is also looked up by name in
    ``$CREDENTIALS_DIRECTORY``: first for a relative ``password_file``, and as the fallback when
    an absolute one is missing or unreadable by the service user. One trailing newline is
    stripped. The password itself never appears in errors or logs.

    Example:
        >>> read_password(MqttSinkConfig(password_env="PW"), {"PW": "s3cret"})
        's3cret'
        >>> read_password(MqttSinkConfig(), {}) is None
        True
    """
    env = os.environ if environ is None else environ
    if cfg.password_file:
        path = Path(cfg.password_file)
        creds = env.get("CREDENTIALS_DIRECTORY", "")
        if not creds:
            candidates = [path]
        elif path.is_absolute():
            candidates = [path, Path(creds) / path.name]
        else:
            candidates = [Path(creds) / path, path]
        problem = "not found"
        for candidate in candidates:
            if not candidate.is_file():
                continue
            try:
                return candidate.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
            except OSError as e:
                problem = f"cannot read {candidate}: {e.strerror or e}"
        where = " or ".join(str(c) for c in candidates)
        raise MqttConfigError(f"sinks.mqtt.password_file: {problem} (looked for {where})")
    if cfg.password_env and env.get(cfg.password_env):
        return env[cfg.password_env]
    return None


def password_source(cfg: MqttSinkConfig) -> str:
    """Where the password comes from, for error messages (never the password itself)."""
    return f"password_file {cfg.password_file}" if cfg.password_file else f"${cfg.password_env}"


def tls_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """The client TLS context for ``[sinks.mqtt.tls]`` (raises OSError / ValueError on bad files).

    Example:
        >>> tls_context(MqttTlsConfig(enabled=True)).verify_mode == ssl.CERT_REQUIRED
        True
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.insecure:
        log.warning("sinks.mqtt.tls.insecure = true: the broker's certificate is NOT verified")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
