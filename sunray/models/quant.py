"""Weight-only quantization of a decode module (QSUN): int8 per output channel, int4 group-wise with AWQ.

Schemes (the name goes into the fingerprint's `quantization` field, so that KV is accepted only by the decode module
it was trained against):
- `int8`: symmetric, one scale per output channel (W8A16).
- `int4-g<G>` (default G = 128): asymmetric 4-bit with a scale and an integer zero point per group of G input
  channels of each output row (W4A16), after AWQ (Lin et al., 2023): per input channel scales s = mean|x|^alpha,
  alpha searched on a grid per layer group to minimize the error of the group's outputs on calibration activations,
  folded into the preceding RMSNorm (q/k/v, gate/up) or linear layer (down; o when there is one KV head per query
  head) so the fp model is unchanged, then each weight clipped to the per-group range that minimizes output error.
  When the input width is not a multiple of G (SmolLM2's 576 with G = 128) the last group is shorter.

`QuantLinear` holds the integer weights and has a reference torch path (dequantize, then matmul), cached per
dtype and device, so that any engine (and training, which sends gradients through the module into its inputs)
runs it. int4 on CUDA with bf16 activations takes the fast path instead (`sunray.models.int4`: tinygemm for small
batches, a Triton GEMM for larger ones, over one packed copy of the weights: 4.25 bits a weight with group 128),
packed on the first such forward or by `prepare_for_inference` (which `Decoder.fuse_weights` calls, packing q/k/v
and gate/up as one weight each), with no dequantized copy. Shapes it cannot take (a group size other than 32, 64,
128, 256; in_features not a multiple of the group) keep the reference path, said once in the log.

On disk a quantized decode module is a model directory: `config.json` and the tokenizer of the base,
`model.safetensors` with `<linear>.qweight`, `<linear>.scales` (and `<linear>.zeros` for int4) in place of
`<linear>.weight`, and `sunray.json` with `quantization` (scheme, bits, group size, method, calibration) and
`base_fingerprint` (the base's, with the scheme as `quantization`). `sunray.models.loader.load_model` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sunray.models import int4
from sunray.models.loader import copy_checked

log = logging.getLogger(__name__)

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


# -- quantize / dequantize ----------------------------------------------------------------------------------------
def _groups(w: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
    """[out, in] -> [out, n_groups, g], zero padded at the end of each row; also returns in_features."""
    out, k = w.shape
    ng = -(-k // g)
    if ng * g != k:
        w = F.pad(w, (0, ng * g - k))
    return w.view(out, ng, g), k


def _group_mask(k: int, g: int, device) -> torch.Tensor:
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
    wg, k = _groups(w.float(), group_size)
    valid = _group_mask(k, group_size, w.device)
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


def _exact_device(device: torch.device | str) -> torch.device:
    """`cuda` as the current CUDA device with its index, so that packed copies compare by device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class QuantLinear(nn.Module):
    """A weight-only quantized `nn.Linear`.

    Reference path: dequantize once per dtype/device (cached), then matmul. Fast path (int4, CUDA, bf16 input that
    needs no gradient): `int4.linear` over a packed copy made on the first such call or by `prepare()`; then no
    dequantized copy exists. The integer weights, scales and zero points are buffers, not parameters: nothing here
    trains, but gradients flow through to the input (on the reference path).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = (
            in_features,
            out_features,
            bits,
            group_size,
        )
        if bits == 8:
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer("scales", torch.zeros(out_features, 1, dtype=dtype, device=device))
            self.zeros = None
        else:
            ng = -(-in_features // group_size)
            self.register_buffer(
                "qweight", torch.zeros(out_features, ng * group_size // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer("scales", torch.zeros(out_features, ng, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._cache: tuple[torch.dtype, torch.device, torch.Tensor] | None = None
        self._packed: int4.Int4Weight | None = None  # the fast path's weight (int4 only)
        self._epoch = 0  # bumped whenever the buffers may have changed: packed copies made before are stale
        self._no_fast: torch.device | None = None  # a device the fast path cannot take this layer on
        self.allow_fast = True  # False: always the reference path (tests compare the two)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        w = linear.weight.detach()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        m = cls(
            linear.in_features,
            linear.out_features,
            spec.bits,
            spec.group_size,
            linear.bias is not None,
            w.device,
            dtype,
        )
        with torch.no_grad():
            if spec.bits == 8:
                q, s = quantize_int8(w)
                m.qweight.copy_(q)
                m.scales.copy_(s)
            else:
                q, s, z = quantize_int4(w, spec.group_size)
                m.qweight.copy_(q)
                m.scales.copy_(s)
                m.zeros.copy_(z)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(
            self.qweight,
            self.scales,
            self.zeros,
            self.bits,
            self.in_features,
            self.group_size,
            dtype or self.scales.dtype,
        )

    def invalidate(self) -> None:
        """Forget the cached dequantized and packed copies (call after writing into the buffers in place)."""
        self._cache = None
        self._packed = None
        self._no_fast = None
        self._epoch += 1

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): cached and packed copies go stale
        self.invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict() writes new values into the buffers
        self.invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def fast_unsupported(self, device: torch.device) -> str | None:
        """Why the fast path cannot run this layer on `device` (None: it can)."""
        if self.bits != 4:
            return "int8 has no fast path yet"
        if not self.allow_fast:
            return "turned off (allow_fast=False)"
        n, k = self.out_features, self.in_features
        return int4.unsupported_reason(n, k, self.group_size, self.scales.dtype, device)

    def prepare(self, device: torch.device | str) -> bool:
        """Pack for the fast path on `device` now (and drop any dequantized copy); False where it cannot run."""
        device = _exact_device(device)
        if self._packed is not None and self._packed.device == device:
            return True
        if self._no_fast == device:
            return False
        reason = self.fast_unsupported(device)
        if reason is not None:
            if self.bits == 4 and self.allow_fast and device.type == "cuda":
                int4.log_once(
                    f"int4 fast path off for a [{self.out_features} x {self.in_features}] layer with group "
                    f"size {self.group_size}: {reason}; it runs the reference path (a dequantized copy)"
                )
            if self.allow_fast:
                self._no_fast = device
            return False
        self._packed = int4.pack(
            self.qweight, self.scales, self.zeros, self.group_size, self.in_features, device, self.bias
        )
        self._cache = None
        return True

    def release_source(self) -> None:
        """Move the integer weights, scales and zero points to host memory, so that the device holds only the packed
        copy (4.25 bits a weight with group 128, instead of twice that). They stay the module's state: saving, the
        reference path and re-packing after a `.to()` read them from there."""
        for name in ("qweight", "scales", "zeros", "bias"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                setattr(self, name, t.cpu())

    def _fast_input(self, x: torch.Tensor) -> bool:
        return (
            self.bits == 4
            and self.allow_fast
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_input(x):
            p = self._packed
            if (p is None or p.device != x.device) and not int4._capturing() and self.prepare(x.device):
                p = self._packed
            if p is not None and p.device == x.device:
                return int4.linear(x, p)
        dtype = self.scales.dtype
        c = self._cache
        if c is None or c[0] != dtype or c[1] != x.device:
            c = self._cache = (dtype, x.device, self.dequantize(dtype).to(x.device))
        bias = self.bias if self.bias is None or self.bias.device == x.device else self.bias.to(x.device)
        return F.linear(x, c[2], bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


class FusedInt4:
    """Several int4 QuantLinears of one input (q/k/v, gate/up) as one packed weight, concatenated along the output
    dimension at pack time. Valid while each member is the same module with the same buffers (`_epoch`) as when it
    was built; `Decoder` falls back to the members otherwise."""

    def __init__(self, linears: list[QuantLinear]) -> None:
        self.members = tuple(linears)
        self.epochs = tuple(m._epoch for m in linears)
        self.weight: int4.Int4Weight | None = None
        self.reason: str | None = None
        self._no_fast: torch.device | None = None
        if len({(m.in_features, m.group_size, m.scales.dtype, m.bias is None) for m in linears}) != 1:
            self.reason = "the layers differ in input width, group size, dtype or bias"

    def valid(self, linears: list[nn.Module]) -> bool:
        return len(linears) == len(self.members) and all(
            a is b and a._epoch == e for a, b, e in zip(linears, self.members, self.epochs)
        )

    def unsupported(self, device: torch.device) -> str | None:
        if self.reason:
            return self.reason
        for m in self.members:
            r = m.fast_unsupported(device)
            if r:
                return r
        return None

    def prepare(self, device: torch.device | str) -> bool:
        device = _exact_device(device)
        if self.weight is not None and self.weight.device == device:
            return True
        if self._no_fast == device:
            return False
        if self.unsupported(device) is not None:
            self._no_fast = device
            return False
        ms = self.members
        bias = None if ms[0].bias is None else torch.cat([m.bias.to(device) for m in ms])
        self.weight = int4.pack(
            torch.cat([m.qweight.to(device) for m in ms]),
            torch.cat([m.scales.to(device) for m in ms]),
            torch.cat([m.zeros.to(device) for m in ms]),
            ms[0].group_size,
            ms[0].in_features,
            device,
            bias,
        )
        for m in ms:
            m._cache = None
        return True

    def __call__(self, x: torch.Tensor, linears: list[nn.Module]) -> torch.Tensor | None:
        """The fused output, or None where the members must run one by one (stale, or not a fast-path input)."""
        if not self.valid(linears):
            self.weight = None  # stale: let the packed copy go
            return None
        if not self.members[0]._fast_input(x):
            return None
        w = self.weight
        if (w is None or w.device != x.device) and not int4._capturing() and self.prepare(x.device):
            w = self.weight
        if w is None or w.device != x.device:
            return None
        return int4.linear(x, w)


def weight_bytes_read(m: QuantLinear, device: torch.device | str) -> int:
    """Bytes of weight one forward of `m` on `device` reads: the packed copy on the int4 fast path (4 bits a weight,
    plus a bf16 scale and zero per group), else the dequantized copy of the reference path."""
    device = torch.device(device)
    n, k = m.out_features, m.in_features
    bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
    if m.bits == 4 and m.fast_unsupported(device) is None:
        return n * k // 2 + (k // m.group_size) * n * 4 + bias
    return n * k * m.scales.element_size() + bias


def fuse_int4(linears: list[nn.Module]) -> FusedInt4 | None:
    """A FusedInt4 over `linears` if they are all int4 QuantLinears (packing waits for a device), else None."""
    if len(linears) < 2 or not all(isinstance(m, QuantLinear) and m.bits == 4 for m in linears):
        return None
    f = FusedInt4(linears)
    return None if f.reason else f


def prepare_for_inference(
    model: nn.Module, device: torch.device | str | None = None, release_source: bool = True
) -> dict:
    """Pack every int4 layer of `model` for the CUDA fast path on `device` (default: where its parameters are), fused
    groups as one weight (build them first with `Decoder.fuse_weights`, which calls this), and with
    `release_source` move the packed layers' integer buffers to host memory so the device holds ~4.25 bits a weight.
    Idempotent. Returns counts and bytes."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    info = {"packed": 0, "fused_groups": 0, "reference": 0, "packed_bytes": 0}
    if not int4.fast_device(device):
        return info
    covered: set[int] = set()
    packed_modules: list[QuantLinear] = []
    for mod in model.modules():
        for v in list(vars(mod).values()):
            f = getattr(v, "quant", None)
            if isinstance(f, FusedInt4) and f.valid(list(f.members)) and f.prepare(device):
                info["fused_groups"] += 1
                info["packed_bytes"] += f.weight.nbytes
                covered.update(id(m) for m in f.members)
                packed_modules += f.members
                for m in f.members:
                    m._packed = None  # a copy of its own (from an earlier unfused run) is not needed
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bits == 4 and id(m) not in covered:
            if m.prepare(device):
                info["packed_bytes"] += m._packed.nbytes
                packed_modules.append(m)
            else:
                info["reference"] += 1
    info["packed"] = len(packed_modules)
    if release_source:
        for m in packed_modules:
            m.release_source()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return info


def _target_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear layer quantization applies to."""
    out = []
    for name, module in model.named_modules():
        for attr in TARGETS:
            child = getattr(module, attr, None)
            if isinstance(child, (nn.Linear, QuantLinear)) and ".layers." in f".{name}.":
                out.append((f"{name}.{attr}", module, attr))
    return out


def replace_linears(model: nn.Module, spec: QuantSpec) -> int:
    """Swap every target nn.Linear of the decoder layers for a QuantLinear (quantizing its weight). Returns how many."""
    n = 0
    for _, parent, attr in _target_linears(model):
        lin = getattr(parent, attr)
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, QuantLinear.from_linear(lin, spec))
            n += 1
    return n


def _empty_quant_linears(model: nn.Module, spec: QuantSpec) -> None:
    """Swap target linears for QuantLinears with empty buffers (to be filled from a checkpoint)."""
    for _, parent, attr in _target_linears(model):
        lin = getattr(parent, attr)
        if isinstance(lin, nn.Linear):
            w = lin.weight
            setattr(
                parent,
                attr,
                QuantLinear(
                    lin.in_features,
                    lin.out_features,
                    spec.bits,
                    spec.group_size,
                    lin.bias is not None,
                    w.device,
                    w.dtype,
                ),
            )


# -- AWQ ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AWQConfig:
    grid: int = 20  # alphas 0, 1/grid, ..., 1
    max_tokens: int = 4096  # calibration rows used in the scale search
    clip: bool = True  # search a per-group clipping range too
    clip_tokens: int = 512
    clip_grid: int = 20
    clip_max_shrink: float = 0.5


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]


def _search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale (and its alpha) that minimizes the quantized outputs' squared error."""
    x = x.float()
    x_mean = x.abs().mean(0)
    ref = [x @ w.float().t() for w in weights]
    best, best_s, best_alpha = math.inf, torch.ones_like(x_mean), 0.0
    for i in range(grid + 1):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, ref):
            wq = fake_quantize(w.float() * s[None, :], spec) / s[None, :]
            err += float((x @ wq.t() - r).pow(2).mean())
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, cfg: AWQConfig) -> torch.Tensor:
    """w clamped, per output row and input group, to the range that minimizes that group's output error (AWQ)."""
    g = spec.group_size
    wg, k = _groups(w.float(), g)  # [out, ng, g]
    xg, _ = _groups(_sample_rows(x.float(), cfg.clip_tokens), g)  # [n, ng, g]
    out_rows = wg.shape[0]
    best_max = wg.abs().amax(-1, keepdim=True).clone()  # [out, ng, 1]
    batch = max(1, (64 << 20) // max(1, xg.shape[0] * xg.shape[1] * 4))
    for start in range(0, out_rows, batch):
        wb = wg[start : start + batch]  # [ob, ng, g]
        ref = torch.einsum("nkg,okg->okn", xg, wb)  # [ob, ng, n]: each group's share of each output
        org_max = wb.abs().amax(-1, keepdim=True)
        best_err = torch.full(org_max.shape, math.inf, device=w.device)
        for i in range(int(cfg.clip_max_shrink * cfg.clip_grid)):
            max_val = org_max * (1 - i / cfg.clip_grid)
            cur = torch.maximum(torch.minimum(wb, max_val), -max_val)
            q = fake_quantize(cur.reshape(cur.shape[0], -1), spec).view_as(cur)
            err = (torch.einsum("nkg,okg->okn", xg, q) - ref).pow(2).mean(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max[start : start + batch] = torch.where(better, max_val, best_max[start : start + batch])
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max)
    return clipped.reshape(out_rows, -1)[:, :k].to(w.dtype)


@torch.no_grad()
def awq_transform(
    model: nn.Module, calib_token_ids: list[list[int]], spec: QuantSpec, cfg: AWQConfig | None = None
) -> dict[str, Any]:
    """Apply AWQ scales (and, for int4, clipping) to `model` in place, layer by layer, from calibration prompts.

    Scales are folded into the preceding op, so the fp model computes the same function afterwards; clipping
    changes the weights only within what quantization would lose anyway. Returns the chosen alphas per layer group.
    """
    # The training backend runs single layers over right-padded batches (imported here: models must not need sun).
    from sunray.sun.attention import TrainContext, positions

    cfg = cfg or AWQConfig()
    if not calib_token_ids:
        raise ValueError("AWQ needs calibration prompts")
    device = next(model.parameters()).device
    b, length = len(calib_token_ids), max(len(t) for t in calib_token_ids)
    ids = torch.zeros(b, length, dtype=torch.long, device=device)
    for i, t in enumerate(calib_token_ids):
        ids[i, : len(t)] = torch.tensor(t, device=device)
    lens = torch.tensor([len(t) for t in calib_token_ids], device=device)
    valid = (torch.arange(length, device=device)[None, :] < lens[:, None]).reshape(-1)
    pos = positions(b, length, limit=model.config.max_position_embeddings)
    x = model.model.embed_tokens(ids.reshape(-1))
    if model.config.embedding_multiplier != 1.0:
        x = x * model.config.embedding_multiplier
    mha = (
        model.config.num_heads == model.config.num_kv_heads
    )  # v -> o folds only without grouped-query attention
    report: dict[str, Any] = {"alphas": {}, "calibration_prompts": b, "calibration_tokens": int(valid.sum())}
    for li, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        feats: dict[str, torch.Tensor] = {}

        def grab(key, feats=feats):
            def hook(_mod, args):
                feats[key] = _sample_rows(args[0].detach()[valid], cfg.max_tokens).float()

            return hook

        hooks = [
            attn.q_proj.register_forward_pre_hook(grab("qkv")),
            attn.o_proj.register_forward_pre_hook(grab("o")),
            mlp.gate_proj.register_forward_pre_hook(grab("gate_up")),
            mlp.down_proj.register_forward_pre_hook(grab("down")),
        ]
        try:
            x_next = layer(
                x, pos, model.rope, TrainContext.causal(b, length)
            )  # the fp layer: next layer's input
        finally:
            for h in hooks:
                h.remove()
        # (group, linears that read the input, what produces the input: a norm or a linear's output rows)
        groups = [
            ("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm),
            ("gate_up", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm),
            ("down", [mlp.down_proj], mlp.up_proj),
        ]
        if mha:
            groups.append(("o", [attn.o_proj], attn.v_proj))
        for key, linears, prev in groups:
            s, alpha = _search_scale(feats[key], [m.weight for m in linears], spec, cfg.grid)
            for m in linears:
                m.weight.mul_(s[None, :].to(m.weight.dtype))
            if isinstance(prev, nn.Linear):
                prev.weight.div_(s[:, None].to(prev.weight.dtype))
                if prev.bias is not None:
                    prev.bias.div_(s.to(prev.bias.dtype))
            else:  # an RMSNorm: its weight scales its output channels
                prev.weight.div_(s.to(prev.weight.dtype))
            feats[key] = feats[key] / s[None, :]  # the input as the scaled linears see it
            report["alphas"][f"{li}.{key}"] = alpha
        if cfg.clip and spec.bits == 4:
            # q/k stay unclipped (attention scores are sensitive to them), as in AWQ.
            for m, key in (
                (attn.v_proj, "qkv"),
                (attn.o_proj, "o"),
                (mlp.gate_proj, "gate_up"),
                (mlp.up_proj, "gate_up"),
                (mlp.down_proj, "down"),
            ):
                m.weight.copy_(_search_clip(m.weight, feats[key], spec, cfg))
        x = x_next
        log.info("AWQ: layer %d/%d", li + 1, len(model.model.layers))
    return report


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    calib_token_ids: list[list[int]] | None = None,
    awq: AWQConfig | None = None,
) -> dict[str, Any]:
    """Quantize `model` in place (AWQ first when the spec asks for it). Returns the manifest's `quantization`."""
    info: dict[str, Any] = {**spec.to_dict(), "method": "rtn", "modules": list(TARGETS)}
    if spec.awq:
        if not calib_token_ids:
            raise ValueError(f"{spec.name} with AWQ needs calibration prompts (or turn AWQ off)")
        t0 = time.perf_counter()
        info["awq_search"] = awq_transform(model, calib_token_ids, spec, awq)
        info["awq_search"]["seconds"] = round(time.perf_counter() - t0, 1)
        info["method"] = "awq"
    info["num_quantized"] = replace_linears(model, spec)
    return info


# -- save / load --------------------------------------------------------------------------------------------------
def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    return state


def save_quantized(
    model: nn.Module,
    info: dict[str, Any],
    base_dir: Path,
    out_dir: str | Path,
    base_fingerprint: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized decode module directory (see the module docstring). `base_dir` gives config + tokenizer."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():  # config and tokenizer files; never the base weights or its manifest
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and not f.name.endswith(".index.json")
            and f.name != "sunray.json"
        ):
            shutil.copy2(f, out / f.name)
    save_file(
        quantized_state_dict(model),
        str(out / "model.safetensors"),
        metadata={"format": "pt", "sunray_quantization": info["scheme"]},
    )
    fp = {**base_fingerprint, "quantization": info["scheme"]}
    manifest = {"kind": "decode_module", "quantization": info, "base_fingerprint": fp, **(extra or {})}
    (out / "sunray.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_quantized_weights(model: nn.Module, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Fill `model` (a fresh Decoder) from a quantized checkpoint: swap in QuantLinears, then copy every tensor."""
    spec = QuantSpec(int(info["bits"]), info.get("group_size"), awq=bool(info.get("awq")))
    _empty_quant_linears(model, spec)
    expected = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    copy_checked(expected, state, what="quantized checkpoint")
    warm_caches(model)


def warm_caches(model: nn.Module) -> None:
    """Dequantize every QuantLinear that will run the reference path now, not inside the engine's first step or a CUDA
    graph capture. Layers the CUDA int4 fast path takes get no dequantized copy: they are packed by
    `prepare_for_inference` (from `Decoder.fuse_weights`) or on their first forward, before any capture."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.scales.device.type == "cuda" and m.fast_unsupported(m.scales.device) is None:
                continue
            m._cache = (m.scales.dtype, m.scales.device, m.dequantize())
