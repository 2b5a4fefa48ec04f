"""Helpers shared by tests (real services started and stopped by the tests themselves)."""

from __future__ import annotations

import time


def wait_until(cond, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``cond()`` until it is true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())
