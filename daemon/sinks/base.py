"""What every sink implements. All sinks receive the same events, in order, per camera."""

from __future__ import annotations

from daemon.events import Event


class Sink:
    """Base class of event sinks.

    ``publish`` must not block the pipeline for long: a sink that talks to the network queues
    durably and delivers in its own thread. ``snapshot`` is the JPEG of the entry frame (with
    the person drawn) when one is available.
    """

    name = "sink"

    def start(self) -> None:
        """Begin delivering (default: ready once built). A configuration reload builds a sink,
        tells it the current state (occupancy, streams, people, switches), then starts it."""

    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        raise NotImplementedError

    def occupancy(self, camera: str, region: str, count: int) -> None:
        """Number of people now inside ``region`` changed (default: ignored)."""

    def stream_state(self, camera: str, online: bool) -> None:
        """A camera's stream went online or offline (default: ignored)."""

    def people(self, camera: str, count: int) -> None:
        """Number of people in the camera's view changed (default: ignored)."""

    def detection_state(self, camera: str, enabled: bool) -> None:
        """A camera's detection was switched on or off (default: ignored)."""

    def flush(self) -> None:
        """Make everything published so far durable / delivered as far as the sink can."""

    def close(self) -> None:
        """Flush and release resources."""
        self.flush()

    def handover(self) -> None:
        """Close because a new sink of the same kind takes over at once (a configuration reload);
        whatever this one could not deliver must be left for the new one (default: :meth:`close`)."""
        self.close()
