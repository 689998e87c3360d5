"""GPU tests: run on the GPU machine (`tests/gpu/run_gpu_suite.sh`). Where CUDA is missing they run on the CPU only
under the Triton interpreter (`TRITON_INTERPRET=1`, triton installed), in float32; otherwise they skip."""

from __future__ import annotations

import pytest
import torch

from sunray.models.fused_ops import HAS_TRITON, INTERPRET

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bfloat16 on the GPU (what runs there); float32 under the CPU interpreter, whose bf16 dot is not usable.
DTYPE = torch.bfloat16 if CUDA else torch.float32


def pytest_collection_modifyitems(config, items):
    if CUDA or (HAS_TRITON and INTERPRET):
        return
    skip = pytest.mark.skip(reason="needs CUDA, or TRITON_INTERPRET=1 with triton installed")
    for item in items:
        item.add_marker(skip)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere counts as failure (inf)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


# Relative-error bounds: bf16 operands land between 1e-3 and 1e-2 (METHOD.md); float32 (interpreter) far under.
TOL = 2e-2 if DTYPE is torch.bfloat16 else 1e-4

if INTERPRET and HAS_TRITON and not CUDA:
    # Triton 3.6's interpreter turns a loop bound into an int with int(1-element array), which numpy 2 refuses.
    from triton.runtime import interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
