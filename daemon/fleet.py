"""Fleet: cameras sharded across replicas by rendezvous (highest-random-weight) hashing.

A replica started with ``[fleet] shard = "I/N"`` (or ``regionwatch run --shard I/N``, or the
environment ``REGIONWATCH_FLEET__SHARD=regionwatch-3/5``: a StatefulSet pod name, a slash and the
replica count) runs only the cameras whose id gives shard ``I`` the highest weight among
``0..N-1``. A weight is a keyed BLAKE2b digest of (shard, camera id), never Python's ``hash()``,
so every replica, every run and every Python version agree without talking to each other. Going
from ``N`` to ``N + 1`` replicas moves only the cameras the new shard ``N`` wins (about
``1/(N+1)`` of them); every other camera stays where it was.

Everything a replica owns is named after its shard so replicas never collide: the state dir
(``<dir>/shard-I``: sequence numbers and MQTT outbox), the MQTT client id (``<client_id>-I``)
and status topic (``<prefix>/shard/I/status``), a JSONL file (``events-shard-I.jsonl``), and the
``regionwatch_shard_info{shard, shards}`` metric. Without a shard nothing changes.

Example:
    >>> s = Shard.parse("regionwatch-2/3")
    >>> s, s.index, s.count
    (Shard('2/3'), 2, 3)
    >>> assign(["hall", "door", "yard", "dock", "gate"], 2)
    {0: ['yard'], 1: ['hall', 'door', 'dock', 'gate']}
    >>> moved = [c for c in ["hall", "door", "yard", "dock", "gate"] if owner(c, 2) != owner(c, 3)]
    >>> {c: owner(c, 3) for c in moved}  # only to the new shard 2
    {'door': 2}
    >>> client_id("regionwatch", s), status_topic("regionwatch", s), status_topic("regionwatch", None)
    ('regionwatch-2', 'regionwatch/shard/2/status', 'regionwatch/status')
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module (to validate [fleet] shard)
    from daemon.config import CameraConfig, Settings
    from daemon.state import SeqStore

log = logging.getLogger(__name__)

MAX_SHARDS = 1024
_SHARD = re.compile(r"^(?:(?P<name>.+)-)?(?P<index>\d+)/(?P<count>\d+)$")
_PERSON = b"regionwatch/hrw"  # BLAKE2b personalisation: these weights mean nothing elsewhere


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"the shard count must be 1..{MAX_SHARDS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard index {self.index} is not in 0..{self.count - 1} (was the StatefulSet scaled "
                f"without changing the count after the slash?)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"``, or a StatefulSet pod name and the count: ``"regionwatch-3/5"`` is shard 3 of 5.

        Example:
            >>> Shard.parse("0/1"), Shard.parse("cams-east-regionwatch-12/16")
            (Shard('0/1'), Shard('12/16'))
            >>> Shard.parse("3/3")
            Traceback (most recent call last):
            ...
            ValueError: shard index 3 is not in 0..2 (was the StatefulSet scaled without changing the count after the slash?)
        """
        m = _SHARD.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not I/N (e.g. 2/5) or POD-NAME-I/N (e.g. regionwatch-2/5)")
        return cls(int(m["index"]), int(m["count"]))

    def owns(self, camera_id: str) -> bool:
        return owner(camera_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def __repr__(self) -> str:
        return f"Shard('{self}')"


def weight(shard: int, camera_id: str) -> int:
    """The rendezvous weight of ``camera_id`` on ``shard``: 64 bits of a BLAKE2b digest.

    Independent of the shard count, which is what keeps moves minimal when it changes.

    Example:
        >>> weight(0, "hall")
        16135895147407087707
    """
    digest = hashlib.blake2b(f"{shard}\x00{camera_id}".encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big")


def owner(camera_id: str, count: int) -> int:
    """The shard (0..count-1) that runs ``camera_id``: the highest weight wins (ties: lowest index)."""
    return max(range(count), key=lambda j: (weight(j, camera_id), -j))


def assign(camera_ids: Iterable[str], count: int) -> dict[int, list[str]]:
    """Every shard's cameras, in the given order (shards with no camera have an empty list)."""
    out: dict[int, list[str]] = {j: [] for j in range(count)}
    for cid in camera_ids:
        out[owner(cid, count)].append(cid)
    return out


# -- what must stay unique per shard ---------------------------------------------------------

def client_id(base: str, shard: Shard | None) -> str:
    """The MQTT client id of a replica: ``base`` alone, or ``base-I`` (the broker allows one per id)."""
    return f"{base}-{shard.index}" if shard else base


def status_topic(prefix: str, shard: Shard | None) -> str:
    """The retained online/offline/stopped topic (and last will) of a replica.

    Home Assistant discovery availability must point here: each replica has its own last will.
    """
    prefix = prefix.rstrip("/")
    return f"{prefix}/shard/{shard.index}/status" if shard else f"{prefix}/status"


def state_dir(base: str, shard: Shard | None) -> str:
    """A replica's state dir (seq numbers, MQTT outbox, snapshots): ``base/shard-I``.

    Per index, not per count: a replica keeps its outbox when the fleet is resized.
    """
    return str(Path(base) / f"shard-{shard.index}") if shard else base


def jsonl_path(path: str, shard: Shard | None) -> str:
    """``events.jsonl`` becomes ``events-shard-I.jsonl``: replicas never append to one file."""
    if not path or not shard:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-shard-{shard.index}{p.suffix}"))


@dataclasses.dataclass(frozen=True)
class FleetPlan:
    """What one replica runs: its shard, its view of the settings and the cameras others run.

    ``settings`` is the configuration with the camera list cut down to this shard's cameras and
    the per-shard state dir and JSONL path; everything downstream uses it unchanged. The MQTT
    client id and status topic are derived by the sink (:func:`client_id`, :func:`status_topic`),
    which keeps ``[sinks.mqtt] client_id`` as the fleet-wide name for Home Assistant ids.
    """

    shard: Shard | None
    settings: Settings
    others: tuple[str, ...]  # configured cameras that other shards run
    configured: int  # cameras in the whole configuration
    all_files: bool  # every enabled camera of the fleet is a file: replicas exit when done

    @classmethod
    def of(cls, settings: Settings) -> FleetPlan:
        shard = settings.fleet.parsed
        enabled = [c for c in settings.cameras if c.enabled]
        all_files = all(not c.is_live for c in enabled)
        if shard is None:
            return cls(None, settings, (), len(settings.cameras), all_files)
        mine: list[CameraConfig] = [c for c in settings.cameras if shard.owns(c.id)]
        others = tuple(c.id for c in settings.cameras if not shard.owns(c.id))
        view = settings.model_copy(update={
            "cameras": mine,  # may be empty: the replica then idles (and is ready)
            "state": settings.state.model_copy(update={"dir": state_dir(settings.state.dir, shard)}),
            "sinks": settings.sinks.model_copy(update={
                "jsonl": settings.sinks.jsonl.model_copy(update={"path": jsonl_path(settings.sinks.jsonl.path, shard)}),
            }),
        })
        return cls(shard, view, others, len(settings.cameras), all_files)

    def describe(self) -> str:
        """One line for logs and ``check-config``: ``shard 1/3 runs 2 of 9 cameras: hall, yard``."""
        cams = [c.id for c in self.settings.cameras]
        if self.shard is None:
            return f"no shard: runs all {len(cams)} cameras"
        return f"shard {self.shard} runs {len(cams)} of {self.configured} cameras: {', '.join(cams) or '(none)'}"

    def release(self, seq: SeqStore) -> list[str]:
        """Forget the ``seq`` numbering of cameras that other shards now run; returns them.

        A camera that moves starts again at ``seq`` 1 on its new replica (which has no record of
        it). Forgetting it here keeps that rule true if it ever moves back, instead of resuming an
        old count that would look like a gap. Its events still waiting in this replica's outbox
        are delivered from here as usual; they carry the old numbering.
        """
        gone = sorted(set(seq.cameras()) & set(self.others))
        if gone:
            seq.forget(gone)
            log.warning(
                "shard %s: camera(s) %s now run on other shard(s) (fleet resized?): their seq numbering "
                "restarts at 1 there; undelivered events for them in this replica's outbox are still "
                "delivered from here", self.shard, ", ".join(gone),
            )
        return gone

    def export(self, metrics) -> None:
        """``regionwatch_shard_info``, ``regionwatch_cameras`` and ``regionwatch_cameras_configured``.

        A replica without a shard reports itself as shard 0 of 1.
        """
        shard = self.shard or Shard(0, 1)
        metrics.shard.info({"shard": str(shard.index), "shards": str(shard.count)})
        metrics.cameras.set(len(self.settings.cameras))
        metrics.cameras_configured.set(self.configured)

