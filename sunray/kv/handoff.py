"""The KV hand-off on the wire. The hand-off itself (`KVHandoff`, `KVHandoffError`) is the engines' object and lives
in `sunray.engine.handoff`; this module turns it into bytes and back, for the transports (`sunray.kv.transport`).

Wire format (`to_bytes`): b"SUNKV" + version byte, a little-endian u32 header length, a msgpack header, then the
raw KV buffer ([layers, 2, tokens, kv_heads, head_dim] in the header's dtype, C order). The header (`header`)
carries what a decode worker needs to check and continue the request: base fingerprint, dtype, shapes, token ids,
sampling parameters and detokenization state.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import torch

from sunray.engine.handoff import KVHandoff, KVHandoffError, dtype_name
from sunray.engine.sequence import SamplingParams
from sunray.models.fingerprint import Fingerprint

__all__ = [
    "DTYPES",
    "MAGIC",
    "KVHandoff",
    "KVHandoffError",
    "from_bytes",
    "from_header",
    "header",
    "to_bytes",
]

MAGIC = b"SUNKV\x01"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def header(handoff: KVHandoff) -> dict[str, Any]:
    """Everything of the hand-off but the KV tensor itself, as msgpack-able values."""
    h = handoff
    return {
        "request_id": h.request_id,
        "model": h.model,
        "fingerprint": h.fingerprint.to_dict(),
        "dtype": dtype_name(h.kv.dtype),
        "shape": list(h.kv.shape),
        "prompt_token_ids": h.prompt_token_ids,
        "output_token_ids": h.output_token_ids,
        "sampling": h.sampling.to_dict(),
        "text": h.text,
        "detok_offsets": list(h.detok_offsets) if h.detok_offsets else None,
    }


def to_bytes(handoff: KVHandoff) -> bytes:
    packed = msgpack.packb(header(handoff), use_bin_type=True)
    kv = handoff.kv.detach().contiguous().cpu()
    raw = kv.view(torch.uint8).numpy().tobytes() if kv.numel() else b""
    return MAGIC + struct.pack("<I", len(packed)) + packed + raw


def from_bytes(data: bytes | memoryview) -> KVHandoff:
    """Parse the wire format. Any damaged or inconsistent message raises KVHandoffError, nothing else."""
    data = memoryview(data)
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise KVHandoffError("not a sunray KV hand-off (bad magic or version)")
    start = len(MAGIC) + 4
    if len(data) < start:
        raise KVHandoffError(f"truncated KV hand-off: {len(data)} bytes, too short for the header length")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    if len(data) < start + hlen:
        raise KVHandoffError(
            f"truncated KV hand-off: the header needs {hlen} bytes, {len(data) - start} follow"
        )
    try:
        h = msgpack.unpackb(data[start : start + hlen], raw=False)
    except Exception as e:  # msgpack raises several types for damaged input
        raise KVHandoffError(f"damaged KV hand-off header: {e}") from None
    if not isinstance(h, dict):
        raise KVHandoffError(f"damaged KV hand-off header: a msgpack {type(h).__name__}, not a map")
    if h.get("dtype") not in DTYPES:
        raise KVHandoffError(f"unsupported KV dtype {h.get('dtype')!r}")
    shape = h.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise KVHandoffError(f"damaged KV hand-off header: shape {shape!r} is not a list of sizes")
    dtype, shape = DTYPES[h["dtype"]], tuple(shape)
    payload = data[start + hlen :]
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(payload) != expected:
        raise KVHandoffError(f"KV payload is {len(payload)} bytes, header says {expected}")
    flat = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if expected
        else torch.empty(0, dtype=torch.uint8)
    )
    kv = flat.view(dtype).reshape(shape)
    return from_header(h, kv)


def from_header(h: dict[str, Any], kv: torch.Tensor) -> KVHandoff:
    """The hand-off from a parsed header and its KV tensor (from the wire, or from GPU memory by CUDA IPC)."""
    if dtype_name(kv.dtype) != h.get("dtype") or list(kv.shape) != list(h.get("shape", ())):
        raise KVHandoffError(
            f"KV tensor {dtype_name(kv.dtype)} {list(kv.shape)} does not match the header "
            f"({h.get('dtype')} {h.get('shape')})"
        )
    try:
        offsets = h.get("detok_offsets")
        return KVHandoff(
            request_id=h["request_id"],
            model=h["model"],
            fingerprint=Fingerprint.from_dict(h["fingerprint"]),
            prompt_token_ids=list(h["prompt_token_ids"]),
            output_token_ids=list(h["output_token_ids"]),
            sampling=SamplingParams.from_dict(h["sampling"]),
            kv=kv,
            text=h.get("text", ""),
            detok_offsets=tuple(offsets) if offsets else None,
        )
    except KVHandoffError:
        raise
    except KeyError as e:
        raise KVHandoffError(f"damaged KV hand-off header: field {e} is missing") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise KVHandoffError(f"damaged KV hand-off header: {e}") from None
