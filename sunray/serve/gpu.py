"""GPU utilization through NVML, or None where there is no NVML (CPU machines): the router then falls back to
queue depth and KV. NVML ignores CUDA_VISIBLE_DEVICES, so the index comes from Ray's GPU assignment."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _nvml_handle():
    try:
        import pynvml

        pynvml.nvmlInit()
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
        index = int(ids[0]) if ids else 0
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # NVMLError_LibraryNotFound on CPU machines, or no GPU assigned
        log.info("GPU utilization unknown (%s)", type(e).__name__)
        return None


def gpu_utilization() -> float | None:
    """Percent of the last sample period the GPU was busy, or None when unknown."""
    handle = _nvml_handle()
    if handle is None:
        return None
    import pynvml

    try:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        return None
