"""Links to the daemon's HTTP listener that other machines can follow.

Events carry a link to their snapshot, and Home Assistant shows a link to the preview page. The
listener may be bound to a wildcard address or to loopback, so the base URL is
``[metrics] public_url`` when set; otherwise ``http://<bound host>:<port>``, where a wildcard
address (``0.0.0.0``, ``::``) becomes this machine's host name.

Example:
    >>> from daemon.config import MetricsConfig
    >>> public_base_url(MetricsConfig(public_url="https://cams.example.org/rw/"), None)
    'https://cams.example.org/rw'
    >>> public_base_url(MetricsConfig(), None) is None   # no listener
    True
    >>> host_url("::1", 9108), host_url("127.0.0.1", 9108)
    ('http://[::1]:9108', 'http://127.0.0.1:9108')
"""

from __future__ import annotations

import socket


def host_url(host: str, port: int) -> str:
    """``http://host:port`` with IPv6 literals bracketed."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def public_base_url(config, server) -> str | None:
    """The base URL of the listener for others (no trailing slash), or None without a listener.

    ``config`` is the ``[metrics]`` section; ``server`` a started
    :class:`~daemon.ops.httpd.OpsServer` or None.
    """
    if config.public_url:
        return config.public_url.rstrip("/")
    if server is None or not server.running:
        return None
    host, port = server.address
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # no DNS lookup: it could stall the start
    return host_url(host, port)
