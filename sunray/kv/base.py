"""The KV transport interface: what every backend of `sunray.kv.transport` (and `sunray.kv.nccl`) implements."""

from __future__ import annotations

import abc
from typing import Any

from sunray.engine.handoff import KVHandoff


class KVTransportError(RuntimeError):
    """The KV could not be moved (a peer died, timed out or refused); the request can be prefilled again."""


class KVTransport(abc.ABC):
    """A `sunray.engine.handoff.HandoffTransport` with a name, for the serving layer's `kv_transport` setting."""

    name: str
    blocking = False  # True: receive() waits on the network, so an event loop calls it in a thread

    @abc.abstractmethod
    def send(self, handoff: KVHandoff) -> Any:
        """Make the hand-off available to a receiver; returns what the receiver needs to fetch it."""

    @abc.abstractmethod
    def receive(self, ref: Any) -> KVHandoff:
        """The hand-off that `send` published."""

    def close(self) -> None:  # noqa: B027 (an optional hook: most transports hold nothing)
        """Release connections and threads."""
