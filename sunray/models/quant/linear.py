"""The quantized linear layers and their dispatch: `QuantLinear` holds integer weights and runs the reference torch
path (dequantize once per dtype and device, cached, then matmul: every device, and gradients flow through to the
input) or, for int4 on CUDA with bf16 activations, the fast path of `sunray.models.int4` (tinygemm or a Triton
GEMM over one packed copy). `FusedInt4` packs several int4 layers of one input (q/k/v, gate/up) as one weight;
`prepare_for_inference` packs a whole model (`Decoder.fuse_weights` calls it); `replace_linears` quantizes a
model's target linears in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sunray.models import int4
from sunray.models.quant.formats import TARGETS, QuantSpec, dequantize, quantize_int4, quantize_int8


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


def empty_quant_linears(model: nn.Module, spec: QuantSpec) -> None:
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


def warm_caches(model: nn.Module) -> None:
    """Dequantize every QuantLinear that will run the reference path now, not inside the engine's first step or a CUDA
    graph capture. Layers the CUDA int4 fast path takes get no dequantized copy: they are packed by
    `prepare_for_inference` (from `Decoder.fuse_weights`) or on their first forward, before any capture."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.scales.device.type == "cuda" and m.fast_unsupported(m.scales.device) is None:
                continue
            m._cache = (m.scales.dtype, m.scales.device, m.dequantize())
