"""Quantization formats: the schemes (`QuantSpec`: int8 per output channel, int4 group-wise), and quantizing a
float weight to integers, scales and zero points and back (`dequantize`, `fake_quantize`). Pure tensor functions;
the layers that hold such weights are in `sunray.models.quant.linear`.

int4 packs two values a byte, low nibble first: qweight [out, ceil(in / g) * g / 2] uint8, scales float [out,
n_groups], zeros uint8 [out, n_groups]. When the input width is not a multiple of the group size G (SmolLM2's 576
with G = 128) the last group is shorter (zero padded in the packed form).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SCHEME = re.compile(r"^int(8|4)(?:-g(\d+))?$")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int  # 8 or 4
    group_size: int | None = None  # int4 only; None for int8 (per output channel)
    awq: bool = True  # int4: activation-aware scales and clipping (needs calibration prompts)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 is per output channel; it takes no group size")
        if self.bits == 4 and (self.group_size is None or self.group_size < 8 or self.group_size % 2):
            raise ValueError(f"int4 needs an even group size >= 8, got {self.group_size}")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    @classmethod
    def parse(cls, scheme: str, group_size: int | None = None, awq: bool | None = None) -> QuantSpec:
        """`int8`, `int4` (group size from `group_size`, default 128) or `int4-g64`."""
        m = _SCHEME.match(scheme.strip().lower())
        if not m:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use int8, int4 or int4-g<group size>")
        bits = int(m.group(1))
        if bits == 8:
            if m.group(2) or group_size:
                raise ValueError("int8 is per output channel; it takes no group size")
            return cls(8, None, awq=bool(awq))
        g = int(m.group(2)) if m.group(2) else (group_size or 128)
        if m.group(2) and group_size and group_size != g:
            raise ValueError(f"scheme {scheme!r} and group size {group_size} disagree")
        return cls(4, g, awq=True if awq is None else awq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "awq": self.awq,
            "symmetric": self.bits == 8,
        }


def split_groups(w: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
    """[out, in] -> [out, n_groups, g], zero padded at the end of each row; also returns in_features."""
    out, k = w.shape
    ng = -(-k // g)
    if ng * g != k:
        w = F.pad(w, (0, ng * g - k))
    return w.view(out, ng, g), k


def group_mask(k: int, g: int, device) -> torch.Tensor:
    """[n_groups, g] True where a padded group holds a real input channel."""
    ng = -(-k // g)
    return (torch.arange(ng * g, device=device) < k).view(ng, g)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (qweight int8 [out, in], scales float32 [out, 1])."""
    w = w.float()
    scales = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-10)
    q = torch.clamp(torch.round(w / scales), -127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: (qweight uint8 [out, ceil(in / g) * g / 2] two values a byte, low nibble first;
    scales float32 [out, n_groups]; zeros uint8 [out, n_groups])."""
    wg, k = split_groups(w.float(), group_size)
    valid = group_mask(k, group_size, w.device)
    big = torch.finfo(torch.float32).max
    wmax = torch.where(valid, wg, -big).amax(-1)
    wmin = torch.where(valid, wg, big).amin(-1)
    wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)  # keep 0 exactly representable
    scales = ((wmax - wmin) / 15.0).clamp(min=1e-10)
    zeros = torch.clamp(torch.round(-wmin / scales), 0, 15)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 15).to(torch.uint8)
    q = q.view(q.shape[0], -1)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, zeros.to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, n / 2] uint8 -> [out, n] uint8 values 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight [out, in] a quantized weight stands for (computed in float32, returned in `dtype`)."""
    if bits == 8:
        return (qweight.float() * scales.float()).to(dtype)
    q = unpack_int4(qweight).float().view(qweight.shape[0], -1, group_size)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(qweight.shape[0], -1)[:, :in_features].to(dtype)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize then dequantize, in float32."""
    if spec.bits == 8:
        q, s = quantize_int8(w)
        return dequantize(q, s, None, 8, w.shape[1])
    q, s, z = quantize_int4(w, spec.group_size)
    return dequantize(q, s, z, 4, w.shape[1], spec.group_size)
