"""The KV hand-off from a prefill module to the shared decode module.

Wire format (`to_bytes`): b"SUNKV" + version byte, a little-endian u32 header length, a msgpack header, then the
raw KV buffer ([layers, 2, tokens, kv_heads, head_dim] in the header's dtype, C order). The header carries what a
decode worker needs to check and continue the request: base fingerprint, dtype, shapes, token ids, sampling
parameters and detokenization state.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import torch

from sunray.engine.sequence import SamplingParams, Sequence
from sunray.models.fingerprint import Fingerprint

MAGIC = b"SUNKV\x01"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVHandoffError(ValueError):
    """KV that a decode worker must not use: another base, another shape or dtype, or a damaged message."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class KVHandoff:
    request_id: str
    model: str  # the task model whose prefill module wrote this KV
    fingerprint: Fingerprint
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # at least the first token; the KV covers prompt + output[:-1]
    sampling: SamplingParams
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim]
    text: str = ""
    detok_offsets: tuple[int, int] | None = None

    @property
    def num_kv_tokens(self) -> int:
        return self.kv.shape[2]

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def __post_init__(self) -> None:
        expected = len(self.prompt_token_ids) + len(self.output_token_ids) - 1
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise KVHandoffError(
                f"KV must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(self.kv.shape)}"
            )
        if not self.output_token_ids:
            raise KVHandoffError("a hand-off needs the first output token")
        if self.kv.shape[2] != expected:
            raise KVHandoffError(f"KV holds {self.kv.shape[2]} tokens, the token ids say {expected}")

    @classmethod
    def from_sequence(cls, seq: Sequence, fingerprint: Fingerprint, kv: torch.Tensor) -> KVHandoff:
        return cls(
            request_id=seq.request_id,
            model=seq.model,
            fingerprint=fingerprint,
            prompt_token_ids=list(seq.prompt_token_ids),
            output_token_ids=list(seq.output_token_ids),
            sampling=seq.sampling,
            kv=kv,
            text=seq.text,
            detok_offsets=seq.detok_offsets,
        )

    def to_sequence(self) -> Sequence:
        """The request as the decode side continues it; text already handed out is not sent again."""
        seq = Sequence(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling=self.sampling,
            model=self.model,
            output_token_ids=list(self.output_token_ids),
            text=self.text,
            detok_offsets=self.detok_offsets,
        )
        seq.emitted_tokens, seq.emitted_chars = len(seq.output_token_ids), len(seq.text)
        return seq

    def header(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "fingerprint": self.fingerprint.to_dict(),
            "dtype": dtype_name(self.kv.dtype),
            "shape": list(self.kv.shape),
            "prompt_token_ids": self.prompt_token_ids,
            "output_token_ids": self.output_token_ids,
            "sampling": self.sampling.to_dict(),
            "text": self.text,
            "detok_offsets": list(self.detok_offsets) if self.detok_offsets else None,
        }

    def to_bytes(self) -> bytes:
        header = msgpack.packb(self.header(), use_bin_type=True)
        kv = self.kv.detach().contiguous().cpu()
        raw = kv.view(torch.uint8).numpy().tobytes() if kv.numel() else b""
        return MAGIC + struct.pack("<I", len(header)) + header + raw

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> KVHandoff:
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
        if h.get("dtype") not in _DTYPES:
            raise KVHandoffError(f"unsupported KV dtype {h.get('dtype')!r}")
        shape = h.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise KVHandoffError(f"damaged KV hand-off header: shape {shape!r} is not a list of sizes")
        dtype, shape = _DTYPES[h["dtype"]], tuple(shape)
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
        return cls.from_header(h, kv)

    @classmethod
    def from_header(cls, h: dict[str, Any], kv: torch.Tensor) -> KVHandoff:
        """The hand-off from a parsed header and its KV tensor (from the wire, or from GPU memory by CUDA IPC)."""
        if dtype_name(kv.dtype) != h.get("dtype") or list(kv.shape) != list(h.get("shape", ())):
            raise KVHandoffError(
                f"KV tensor {dtype_name(kv.dtype)} {list(kv.shape)} does not match the header "
                f"({h.get('dtype')} {h.get('shape')})"
            )
        try:
            offsets = h.get("detok_offsets")
            return cls(
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
