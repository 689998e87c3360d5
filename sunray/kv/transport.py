"""How a KV hand-off travels from a prefill worker to a decode worker. One interface, several backends:
in-process (no copy), serialized bytes (the wire format, as any process boundary sees it); the serving layer adds
the Ray object store, and CUDA IPC / NCCL between GPUs."""

from __future__ import annotations

import abc
from typing import Any

from sunray.kv.handoff import KVHandoff


class KVTransport(abc.ABC):
    name: str

    @abc.abstractmethod
    def send(self, handoff: KVHandoff) -> Any:
        """Make the hand-off available to a receiver; returns what the receiver needs to fetch it."""

    @abc.abstractmethod
    def receive(self, ref: Any) -> KVHandoff:
        """The hand-off that `send` published."""


class InProcessTransport(KVTransport):
    """Prefill and decode in one process: the tensor itself moves, nothing is copied."""

    name = "inprocess"

    def send(self, handoff: KVHandoff) -> KVHandoff:
        return handoff

    def receive(self, ref: KVHandoff) -> KVHandoff:
        return ref


class BytesTransport(KVTransport):
    """Through the wire format (msgpack header + raw buffer), as across a process or machine boundary."""

    name = "bytes"

    def send(self, handoff: KVHandoff) -> bytes:
        return handoff.to_bytes()

    def receive(self, ref: bytes) -> KVHandoff:
        return KVHandoff.from_bytes(ref)


TRANSPORTS: dict[str, type[KVTransport]] = {"inprocess": InProcessTransport, "bytes": BytesTransport}


def get_transport(name: str) -> KVTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; available: {', '.join(TRANSPORTS)}") from None
