"""A real, small file system that tests fill up and free again: a 1 MiB tmpfs.

Mounting needs root (or CAP_SYS_ADMIN); :func:`mount_small_fs` returns None (with the reason
in ``last_error``) where that is not permitted, and tests skip with that message.

Example (not run here: it mounts)::

    fs = mount_small_fs(tmp_path / "state")
    try:
        fs.fill()      # every write now fails with ENOSPC
        fs.free()      # and works again
    finally:
        fs.unmount()
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

last_error = ""


class SmallFs:
    """A mounted tmpfs of ``size`` bytes at ``path``."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / ".filler"

    def fill(self) -> int:
        """Write a filler file until the file system is full (down to the last byte); returns its size."""
        written = 0
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (65536, 4096, 512, 1):
                while True:
                    try:
                        written += f.write(b"\0" * chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def mount_small_fs(path: Path, size: str = "1m") -> SmallFs | None:
    """Mount a fresh tmpfs of ``size`` at ``path`` (created), or None where mounting is not permitted."""
    global last_error
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        last_error = "no mount command"
        return None
    if os.geteuid() != 0:
        last_error = "mounting a tmpfs needs root"
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        last_error = f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"
        return None
    return SmallFs(path)
