"""How a KV hand-off travels from a prefill worker to a decode worker. One interface (`sunray.kv.base.KVTransport`,
which the engines see as `sunray.engine.handoff.HandoffTransport`), several backends: in-process (no copy),
serialized bytes (the wire format, as any process boundary sees it), the Ray object store (the serving default),
CUDA IPC (one GPU or node), NCCL between GPUs (`kv/nccl.py`: `send` returns the header and the sender's address,
`receive` pulls the KV by a matched send/recv of a process group of that pair; gloo on the CPU)."""

from __future__ import annotations

from collections.abc import Callable

import msgpack

from sunray.engine.handoff import KVHandoff
from sunray.kv import handoff as wire
from sunray.kv.base import KVTransport, KVTransportError

__all__ = [
    "TRANSPORTS",
    "BytesTransport",
    "CudaIPCTransport",
    "InProcessTransport",
    "KVTransport",
    "KVTransportError",
    "ObjectStoreTransport",
    "get_transport",
]


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
        return wire.to_bytes(handoff)

    def receive(self, ref: bytes) -> KVHandoff:
        return wire.from_bytes(ref)


class ObjectStoreTransport(KVTransport):
    """The Ray object store (the serving default, on any machine and across nodes): the wire format is put once
    and read zero-copy by the receiver. The sender must keep the returned ref alive until the receiver has it."""

    name = "object_store"

    def send(self, handoff: KVHandoff):
        import ray

        return ray.put(wire.to_bytes(handoff))

    def receive(self, ref) -> KVHandoff:
        import ray

        # A ref passed as a top-level task argument arrives already resolved to its bytes.
        return wire.from_bytes(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)


class CudaIPCTransport(KVTransport):
    """Prefill and decode on one GPU (or one node): the KV stays in GPU memory; only the msgpack header and a
    CUDA IPC handle travel. The sender keeps the tensor alive until the receiver has copied it into its cache
    (the serving layer releases it after the request's first decode output)."""

    name = "cuda_ipc"

    def send(self, handoff: KVHandoff) -> tuple[bytes, tuple]:
        from torch.multiprocessing.reductions import reduce_tensor

        if not handoff.kv.is_cuda:
            raise ValueError("cuda_ipc moves GPU tensors only; use object_store for KV on the CPU")
        return msgpack.packb(wire.header(handoff), use_bin_type=True), reduce_tensor(handoff.kv.contiguous())

    def receive(self, ref: tuple[bytes, tuple]) -> KVHandoff:
        header, (rebuild, args) = ref
        return wire.from_header(msgpack.unpackb(header, raw=False), rebuild(*args))


def _nccl(**options) -> KVTransport:
    from sunray.kv.nccl import NcclTransport  # imported when asked for: it brings torch.distributed

    return NcclTransport(**options)


TRANSPORTS: dict[str, Callable[..., KVTransport]] = {
    "inprocess": InProcessTransport,
    "bytes": BytesTransport,
    "object_store": ObjectStoreTransport,
    "cuda_ipc": CudaIPCTransport,
    "nccl": _nccl,  # options: device, timeout_s, connect_timeout_s, hold_s, host
}


def get_transport(name: str, **options) -> KVTransport:
    """A transport by name; `options` go to its constructor (only nccl takes any)."""
    try:
        make = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; available: {', '.join(TRANSPORTS)}") from None
    return make(**options)
